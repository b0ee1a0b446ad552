"""Run one of torchtune's own recipes with NF4 blocks that fit SmolLM2 (used by benchmarks only).

    python -m benchmarks.torchtune_nf4_recipe lora_finetune_single_device --config CONFIG.yaml [key=value …]

torchtune's QLoRA path quantizes with torchao's default blocks (64 × 256), which SmolLM2's
576×576 and 192×576 projections cannot take, so stock ``tune run lora_finetune_single_device``
with ``model.quantize_base=True`` fails while building the model. This runs the unchanged recipe
file (as ``tune run`` does, via runpy) inside ``torchtune_xgb.quant.nf4.fitting_nf4_blocks``: the same
blocks our recipe uses, and nothing else differs. That makes it the fair QLoRA baseline.
"""

import runpy
import sys
from pathlib import Path

import torchtune

from torchtune_xgb.quant.nf4 import fitting_nf4_blocks


def recipe_path(name: str) -> Path:
    """Path of a recipe shipped with torchtune (``site-packages/recipes/<name>.py``)."""
    path = Path(torchtune.__file__).resolve().parent.parent / "recipes" / f"{name}.py"
    if not path.exists():
        sys.exit(f"error: torchtune recipe {name!r} not found at {path}")
    return path


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = recipe_path(sys.argv[1])
    sys.argv = [str(path)] + sys.argv[2:]
    with fitting_nf4_blocks():
        runpy.run_path(str(path), run_name="__main__")


if __name__ == "__main__":
    main()
