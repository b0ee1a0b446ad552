"""Learning-rate restarts across boosting rounds.

torchtune's schedulers are ``LambdaLR``s; instead of replacing them we wrap their lambdas, so
any schedule the user configures keeps working and gains the per-round behaviour:

- ``jagged``: global schedule × a linear re-warmup over ``rewarmup_steps`` after each merge
  (ReLoRA's jagged schedule: fresh adapters should not take full-size steps at once);
- ``none``: the global schedule unchanged;
- ``per_round``: the schedule built for κ steps and restarted every round.
"""

from typing import Callable, List, Optional

import torch
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR
from torchtune import config

from torchtune_xgb.config.boost_config import BoostConfig
from torchtune_xgb.errors import ConfigError


def rewarmup_factor(step: int, steps_per_round: int, rewarmup_steps: int) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): ramps 1/n, 2/n, … 1 after each merge."""
    if rewarmup_steps <= 0 or step < steps_per_round:
        return 1.0  # the first round is covered by the global warmup
    in_round = step % steps_per_round
    return min(1.0, (in_round + 1) / (rewarmup_steps + 1))


def apply_round_restarts(
    scheduler: LambdaLR, boost: BoostConfig, per_round: Optional[LambdaLR] = None
) -> LambdaLR:
    """Wrap ``scheduler``'s lambdas for ``boost.lr_restart``; ``per_round`` is the same schedule
    built for κ steps (needed for "per_round"). Returns the scheduler, changed in place."""
    if boost.lr_restart == "none":
        return scheduler
    if not isinstance(scheduler, LambdaLR):
        raise ConfigError(
            f"boost.lr_restart: {boost.lr_restart!r} needs a LambdaLR-based lr_scheduler "
            f"(all of torchtune's are); got {type(scheduler).__name__}; set boost.lr_restart: none"
        )
    kappa, warm = boost.steps_per_round, boost.rewarmup_steps
    if boost.lr_restart == "per_round":
        inner = per_round.lr_lambdas
        wrapped: List[Callable[[int], float]] = [lambda s, f=f: f(s % kappa) for f in inner]
    else:
        wrapped = [lambda s, f=f: f(s) * rewarmup_factor(s, kappa, warm) for f in scheduler.lr_lambdas]
    scheduler.lr_lambdas = wrapped
    set_scheduler_step(scheduler, scheduler.last_epoch)
    return scheduler


def set_scheduler_step(scheduler: LambdaLR, step: int) -> None:
    """Put ``scheduler`` at ``step`` and set each group's LR from its lambda (used on resume)."""
    scheduler.last_epoch = step
    for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(max(step, 0))
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def with_round_restarts(scheduler: LambdaLR, boost: BoostConfig, cfg_lr_scheduler: DictConfig) -> LambdaLR:
    """``scheduler`` (the configured one, built for the whole run) with ``boost.lr_restart`` applied;
    for "per_round" the same ``lr_scheduler`` block is built again for κ steps to take its lambdas."""
    per_round = None
    if boost.lr_restart == "per_round":
        # only its lambdas are used; a dummy optimizer keeps the real LRs untouched
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        per_round = config.instantiate(cfg_lr_scheduler, dummy, num_training_steps=boost.steps_per_round, last_epoch=-1)
    return apply_round_restarts(scheduler, boost, per_round)
