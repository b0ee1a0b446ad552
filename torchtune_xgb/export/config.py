"""The ``export:`` config block: what ``epoch_N/adapter/`` holds (export/adapter.py writes it)."""

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from torchtune_xgb.config.keys import build_block, key
from torchtune_xgb.errors import ConfigError


@dataclass(frozen=True)
class ExportConfig:
    """The ``export:`` block: what the PEFT adapter in ``epoch_N/adapter/`` holds.

    Each key is defined below with its default, accepted values and meaning (config/keys.py)."""

    adapter_rank: Optional[int] = key(
        None, "integer ≥ 1 or null",
        "null: the PEFT adapter is the run's exact update (per module, rank = merged rounds × r). N: "
        "each module's top-N singular directions (truncated SVD); `xgb_adapter.json` records the "
        "fraction kept per module and the summary the worst (`adapter_min_kept_fraction`).")

    def validate(self) -> None:
        rank = self.adapter_rank
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise ConfigError(f"export.adapter_rank: must be an integer ≥ 1 or null, got {rank!r}")


def parse_export_config(cfg: DictConfig) -> ExportConfig:
    """Check the ``export:`` block (one-line ConfigError naming the key) and return it."""
    block = cfg.get("export")
    if block is not None and not isinstance(block, DictConfig):
        raise ConfigError(f"export: must be a mapping of keys, got {block!r}")
    return build_block(ExportConfig, "export", OmegaConf.to_container(block, resolve=True) if block is not None else None)
