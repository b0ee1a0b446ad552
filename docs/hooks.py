"""MkDocs hooks (mkdocs.yml ``hooks:``): what the site takes from the code and the repository at
build time, so nothing generated is committed and nothing is copied twice in git.

- ``<!-- generated: configuration reference -->`` becomes the tables rendered from the config
  blocks' own key definitions (torchtune_xgb/config/reference.py);
- ``<!-- generated: API -->`` becomes one mkdocstrings entry per public name of ``torchtune_xgb``;
- benchmarks/results/*.png are served as ``assets/results/*.png``;
- CHANGELOG.md (at the repository's root) is served as ``changelog.md``.
"""

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's torchtune_xgb, installed or not

RESULTS = ROOT / "benchmarks" / "results"
CONFIG_MARKER = "<!-- generated: configuration reference -->"
API_MARKER = "<!-- generated: API -->"
PACKAGE_ORDER = ("method", "config", "models", "data", "eval")  # the API page's sections, then any other


def render_api() -> str:
    """A section per subpackage, an mkdocstrings entry per public name (``torchtune_xgb.__all__``)."""
    import torchtune_xgb

    by_package = {package: [] for package in PACKAGE_ORDER}
    for name in torchtune_xgb.__all__:
        module = torchtune_xgb._PUBLIC[name]
        by_package.setdefault(module.split(".")[1], []).append(f"::: {module}.{name}")
    lines = []
    for package, entries in by_package.items():
        if not entries:
            continue
        lines += [f"## `torchtune_xgb.{package}`", ""]
        for entry in entries:
            lines += [entry, ""]
    return "\n".join(lines)


def render_configuration() -> str:
    from torchtune_xgb.config.reference import render_reference

    return render_reference()


def on_files(files, config):
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"assets/results/{png.name}", abs_src_path=str(png)))
    files.append(File.generated(config, "changelog.md", abs_src_path=str(ROOT / "CHANGELOG.md")))
    return files


def on_page_markdown(markdown, page, config, files):
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, render_configuration())
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, render_api())
    return markdown
