"""``tune run xgblora_finetune --config …``: XGBLoRA fine-tuning on one device.

Installed as a top-level module: torchtune runs an unknown recipe name with ``runpy``, so this
works from any directory. ``--config`` takes a path or a packaged name (``tune-xgb ls``).
Launched by torchrun (``tune run --nproc_per_node N xgblora_finetune``) it dispatches to the
distributed recipe.
"""

import os
import sys

from omegaconf import DictConfig
from torchtune import config

from torchtune_xgb.config.names import run_entry_point
from torchtune_xgb.models.cache import register_resolvers
from torchtune_xgb.recipe_mixin import BoostedRecipeMixin
from torchtune_xgb.torchtune_recipes import load_recipe_module

register_resolvers()
_torchtune_lora = load_recipe_module("lora_finetune_single_device")


class XGBLoRAFinetuneRecipeSingleDevice(BoostedRecipeMixin, _torchtune_lora.LoRAFinetuneRecipeSingleDevice):
    """torchtune's single-device LoRA recipe with boosted rank-r rounds (see BoostedRecipeMixin)."""


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Train with XGBLoRA; config keys as torchtune's LoRA recipe plus ``boost:`` and ``eval:``."""
    config.log_config(recipe_name="XGBLoRAFinetuneRecipeSingleDevice", cfg=cfg)
    recipe = XGBLoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def main() -> int:
    if launched_by_torchrun():
        import xgblora_finetune_distributed

        return xgblora_finetune_distributed.main()
    return run_entry_point(recipe_main)


if __name__ == "__main__":
    sys.exit(main())
