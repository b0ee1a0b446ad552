"""The ``eval:`` config block: exact-match evaluation before and after training (and every N steps)."""

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from torchtune_xgb.config.keys import build_block, key, one_of
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.eval.normalize import NORMALIZERS


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class EvalConfig:
    """The ``eval:`` block: exact match on examples with known answers, scored before and after
    training (``exact_match_before`` / ``_after`` in the summary) and, optionally, during it.

    Each key is defined below with its default, accepted values and meaning (config/keys.py)."""

    examples: Optional[Mapping[str, Any]] = key(
        None, "builder block (`_component_`)",
        "The examples to score: `torchtune_xgb.json_eval_examples` (your own JSON / JSON-lines file), "
        "`torchtune_xgb.load_task_eval_examples` (a generated task family), "
        "`torchtune_xgb.load_eval_examples` (the demo's arithmetic), or any builder returning "
        "`prompt_messages` + `answer` records.", required=True)
    normalize: str = key(
        "strip", one_of(NORMALIZERS),
        "How reply and answer are compared: `strip` trimmed text, `lower` case-folded, `number` the "
        "first number of each (`The answer is 85.` = `85`), `none` as decoded.")
    max_new_tokens: int = key(8, "integer ≥ 1", "Greedy decoding stops after this many tokens (or at a stop token).")
    batch_size: int = key(16, "integer ≥ 1", "Prompts decoded together.")
    every_n_steps: Optional[int] = key(
        None, "integer ≥ 1 or null",
        "Also score during training: metric `exact_match` at steps N, 2N, … and at the final step.")

    def validate(self) -> None:
        if self.every_n_steps is not None and not _positive_int(self.every_n_steps):
            raise ConfigError(f"eval.every_n_steps: must be an integer ≥ 1, got {self.every_n_steps!r}")
        if self.normalize not in NORMALIZERS:
            raise ConfigError(f"eval.normalize: must be one of {', '.join(sorted(NORMALIZERS))}, got {self.normalize!r}")
        for name in ("max_new_tokens", "batch_size"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"eval.{name}: must be an integer ≥ 1, got {getattr(self, name)!r}")
        if self.examples is None and self.every_n_steps is not None:
            raise ConfigError("eval.every_n_steps: set, but eval.examples is missing")
        if self.examples is None:
            raise ConfigError("eval.examples: missing (the examples the eval: block scores)")
        if not isinstance(self.examples, Mapping) or "_component_" not in self.examples:
            raise ConfigError(f"eval.examples: must be a builder block with _component_, got {self.examples!r}")

def parse_eval_config(cfg: DictConfig) -> Optional[EvalConfig]:
    """The checked ``eval:`` block (one-line ConfigError naming the key); None without one."""
    block = cfg.get("eval")
    if block is None:
        return None
    if not isinstance(block, DictConfig):
        raise ConfigError(f"eval: must be a mapping of keys, got {block!r}")
    return build_block(EvalConfig, "eval", OmegaConf.to_container(block, resolve=True))
