"""The documentation site builds strictly: a broken link or anchor, a page missing from the nav, or
a docstring the API page cannot render fails here (``mkdocs build --strict``, as ``make docs``
serves it). What the build generates is checked too: the configuration reference and the API page
come from the code, the plots from benchmarks/results/."""

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_the_configuration_reference_is_rendered_from_the_code(site):
    from torchtune_xgb.config.reference import block_keys, top_level_keys

    text = _text(site / "reference" / "configuration" / "index.html")
    keys = [row.key for rows in block_keys().values() for row in rows] + [row.key for row in top_level_keys()]
    assert len(keys) > 30 and not [key for key in keys if key not in text]
    assert "generated: configuration reference" not in text  # the marker was replaced


def test_the_api_page_documents_every_public_name(site):
    import torchtune_xgb

    page = (site / "reference" / "api" / "index.html").read_text()
    missing = [name for name in torchtune_xgb.__all__ if f'id="{torchtune_xgb._PUBLIC[name]}.{name}"' not in page]
    assert not missing


def test_the_benchmark_plots_and_the_changelog_are_part_of_the_site(site):
    plots = sorted(p.name for p in (REPO / "benchmarks" / "results").glob("*.png"))
    assert plots and all((site / "assets" / "results" / name).is_file() for name in plots)
    assert "assets/results/quality_cpu.png" in (site / "results" / "quality" / "index.html").read_text()
    assert "2026-11-23" in _text(site / "changelog" / "index.html")
