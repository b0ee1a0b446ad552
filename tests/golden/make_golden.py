"""Record the golden loss list of the tiny end-to-end run (tests/recipes/test_e2e.py compares to it).

Run from the repository root after a deliberate change of numerics, and say why in the commit:
    .venv/bin/python -m tests.golden.make_golden
"""

import json
import tempfile
from pathlib import Path

from tests.e2e_fixture import GOLDEN_RUNS, losses, run_recipe


def golden_path(name: str) -> Path:
    return Path(__file__).with_name(f"tiny_{name}_losses.json")


def main() -> None:
    for name, make_config in GOLDEN_RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            out = root / "out"
            result = run_recipe(make_config(root, out), root)
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            golden_path(name).write_text(json.dumps({"losses": losses(out)}, indent=2) + "\n")
        print(f"wrote {golden_path(name)}")


if __name__ == "__main__":
    main()
