"""Held-out loss and exact match *during* training, logged like the training loss.

Config keys (all optional; torchtune 0.6.1's LoRA recipe has no validation loop):

    dataset_val:                # any torchtune dataset builder (or a list of them), as `dataset:`
      _component_: torchtune.datasets.alpaca_cleaned_dataset
    run_val_every_n_steps: 50   # metric `val_loss` at steps N, 2N, … and at the final step
    batch_size_val: 8           # default: batch_size
    eval:
      every_n_steps: 50         # metric `exact_match` at steps N, 2N, … and at the final step

``val_loss`` is the token mean of the cross-entropy over the *whole* validation set (no batch
dropped, every target token counted once), the model in eval mode, no gradients, with whatever
adapters are live at that step. Under FSDP2 each rank scores its own slice and the sums are
reduced over ranks; every rank runs the same number of forward passes (FSDP2 collectives), a rank
whose slice ran out scoring a batch whose labels are all ignored.

Without ``run_val_every_n_steps`` a configured ``dataset_val`` is scored once, at the final step.
"""

import math
from functools import partial
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import ConcatDataset, DataLoader
from torchtune import config, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.data import padded_collate_packed

from torchtune_xgb.config.checks import positive_int
from torchtune_xgb.errors import ConfigError

log = utils.get_logger("INFO")

VAL_LOSS = "val_loss"
EXACT_MATCH = "exact_match"
DEFAULT_COLLATE = "torchtune.data.padded_collate_sft"


def validate_periodic_eval_config(cfg: DictConfig) -> None:
    """Check ``dataset_val``, ``run_val_every_n_steps`` and ``batch_size_val`` (one-line ConfigError
    naming the key; ``eval.every_n_steps`` is checked with its block, eval/config.py); loads nothing."""
    every = positive_int(cfg, "run_val_every_n_steps", optional=True)
    positive_int(cfg, "batch_size_val", optional=True)
    dataset_val = cfg.get("dataset_val")
    if every is not None and dataset_val is None:
        raise ConfigError("run_val_every_n_steps: set, but there is no dataset_val to score")
    if dataset_val is not None:
        entries = dataset_val if isinstance(dataset_val, (list, ListConfig)) else [dataset_val]
        for entry in entries:
            if not isinstance(entry, (dict, DictConfig)) or not entry.get("_component_"):
                raise ConfigError(f"dataset_val: must be a dataset builder with _component_ (or a list of them), got {entry!r}")


class PeriodicEval:
    """Scores a recipe's model every N steps and at the final step; logs through its metric logger.

    Build with :meth:`from_config` in the recipe's ``setup`` (after the tokenizer and loss exist)
    and call :meth:`after_step` after every optimizer step, on every rank.
    """

    def __init__(self, recipe, val_loader: Optional[DataLoader], val_every: Optional[int], em_every: Optional[int]):
        self.recipe = recipe
        self.val_loader = val_loader
        self.val_every = val_every
        self.em_every = em_every

    @classmethod
    def from_config(cls, recipe, cfg: DictConfig) -> "PeriodicEval":
        loader = None
        if cfg.get("dataset_val") is not None:
            loader = _val_loader(recipe, cfg)
        em_every = OmegaConf.select(cfg, "eval.every_n_steps")
        return cls(recipe, loader, cfg.get("run_val_every_n_steps"), em_every)

    def _due(self, every: Optional[int], step: int, final: bool) -> bool:
        return final or (every is not None and step % every == 0)

    def after_step(self, step: int, total_steps: int) -> None:
        """Score what is due at ``step`` (call on every rank; rank 0 logs)."""
        final = step == total_steps
        metrics: Dict[str, float] = {}
        if self.val_loader is not None and self._due(self.val_every, step, final):
            metrics[VAL_LOSS] = self.val_loss()
        # the final exact match is the run's `exact_match_after`, logged by log_final_exact_match
        if self.em_every is not None and not final and step % self.em_every == 0:
            metrics[EXACT_MATCH] = self.recipe._exact_match()
        if metrics:
            self.recipe._metric_logger.log_dict(metrics, step=step)
            if self.recipe._is_main_process():
                log.info(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" at step {step}")

    def log_final_exact_match(self, step: int, value: float) -> None:
        """Log the end-of-run exact match as the ``exact_match`` metric at the final step."""
        if self.em_every is not None:
            self.recipe._metric_logger.log_dict({EXACT_MATCH: value}, step=step)

    @torch.no_grad()
    def val_loss(self) -> float:
        """Token-mean cross-entropy over the whole validation set (eval mode, no grad)."""
        recipe = self.recipe
        model = recipe._model
        modes = [(m, m.training) for m in model.modules()]
        ignore = recipe._loss_fn.ignore_index
        device = recipe._device
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, target tokens]
        # the recipes' _loss_step pads shifted labels from a cache sized for the training batch
        saved_cache = recipe.ignore_labels_cache
        rows = max(self.val_loader.batch_size, saved_cache.shape[0])
        recipe.ignore_labels_cache = torch.full((rows, 1), ignore, dtype=saved_cache.dtype, device=saved_cache.device)
        try:
            model.eval()
            for batch in _padded_batches(self.val_loader, recipe):
                utils.batch_to_device(batch, device)
                tokens = (batch["labels"][..., 1:] != ignore).sum()  # the targets after the shift
                loss = recipe._loss_step(batch)  # token mean over this batch's targets
                if tokens > 0:
                    total[0] += loss.double() * tokens
                    total[1] += tokens
        finally:
            recipe.ignore_labels_cache = saved_cache
            for m, mode in modes:
                m.training = mode
        total = recipe._reduce_loss(total)  # summed over ranks (one process: as is)
        if total[1] == 0:
            return float("nan")
        return (total[0] / total[1]).item()


def _padded_batches(loader: DataLoader, recipe):
    """This rank's batches, then batches with every label ignored until each rank has run as many
    forward passes (FSDP2: every forward is a collective)."""
    first = None
    count = 0
    for batch in loader:
        if first is None:
            first = {k: v.clone() for k, v in batch.items()}
        count += 1
        yield batch
    for _ in range(count, loader.forward_passes):
        if first is None:  # this rank has no sample at all: an empty, one-token batch
            yield {"tokens": torch.zeros(1, 1, dtype=torch.long), "labels": torch.full((1, 1), recipe._loss_fn.ignore_index)}
            continue
        filler = {k: v.clone() for k, v in first.items()}
        filler["labels"].fill_(recipe._loss_fn.ignore_index)
        yield filler


def _val_loader(recipe, cfg: DictConfig) -> DataLoader:
    """A loader over this rank's slice of ``dataset_val`` (in order, nothing dropped)."""
    tokenizer = recipe._tokenizer
    cfg_ds = cfg.dataset_val
    if isinstance(cfg_ds, ListConfig):
        ds = ConcatDataset([config.instantiate(c, tokenizer) for c in cfg_ds])
        packed = any(c.get("packed", False) for c in cfg_ds)
    else:
        ds = config.instantiate(cfg_ds, tokenizer)
        packed = cfg_ds.get("packed", False)
    if len(ds) == 0:
        raise ConfigError("dataset_val: the validation dataset is empty")
    world, rank = getattr(recipe, "world_size", 1), getattr(recipe, "rank", 0)
    batch_size = cfg.get("batch_size_val") or cfg.batch_size
    indices = list(range(rank, len(ds), world))
    if packed:
        collate = padded_collate_packed
    else:
        collate = partial(
            _get_component_from_path(cfg.get("collate_fn", DEFAULT_COLLATE)),
            padding_idx=tokenizer.pad_id,
            ignore_idx=recipe._loss_fn.ignore_index,
        )
    loader = DataLoader(torch.utils.data.Subset(ds, indices), batch_size=batch_size, shuffle=False, collate_fn=collate)
    # the same number of forward passes on every rank: the largest slice's batch count
    loader.forward_passes = math.ceil(math.ceil(len(ds) / world) / batch_size)
    return loader
