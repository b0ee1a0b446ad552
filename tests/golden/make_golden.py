"""Record the golden loss list of the tiny end-to-end run (tests/test_e2e.py compares to it).

Run from the repository root after a deliberate change of numerics, and say why in the commit:
    .venv/bin/python -m tests.golden.make_golden
"""

import json
import tempfile
from pathlib import Path

from tests.e2e_fixture import losses, run_recipe, tiny_config

GOLDEN = Path(__file__).with_name("tiny_xgblora_losses.json")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "out"
        result = run_recipe(tiny_config(root, out), root)
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        GOLDEN.write_text(json.dumps({"losses": losses(out)}, indent=2) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
