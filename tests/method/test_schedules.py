"""LR restarts across rounds: the jagged re-warmup, per-round restarts, resuming the schedule."""

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from torchtune_xgb.config.boost_config import BoostConfig
from torchtune_xgb.method.schedules import apply_round_restarts, rewarmup_factor, set_scheduler_step


def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _constant_scheduler(lr=1.0):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    return LambdaLR(opt, lambda s: 1.0)


def test_rewarmup_factor_hand_values():
    # κ = 4, 3 re-warmup steps: the first round is left to the global warmup
    got = [rewarmup_factor(s, 4, 3) for s in range(10)]
    assert got == [1, 1, 1, 1, 0.25, 0.5, 0.75, 1, 0.25, 0.5]
    assert [rewarmup_factor(s, 4, 0) for s in range(8)] == [1.0] * 8


def test_jagged_wraps_any_lambda_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = LambdaLR(opt, lambda s: 1.0 - s / 10)  # a linear decay the user configured
    apply_round_restarts(sched, BoostConfig(steps_per_round=3, rewarmup_steps=1, lr_restart="jagged"))
    expected = [0.1 * (1 - s / 10) * (0.5 if s >= 3 and s % 3 == 0 else 1.0) for s in range(8)]
    assert _lrs(sched, 8) == pytest.approx(expected)


def test_per_round_restarts_schedule_and_none_keeps_it():
    sched = _constant_scheduler()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    per_round = LambdaLR(opt, lambda s: (s + 1) / 3)  # ramps within a round of κ = 3
    apply_round_restarts(sched, BoostConfig(steps_per_round=3, lr_restart="per_round"), per_round)
    assert _lrs(sched, 7) == pytest.approx([1 / 3, 2 / 3, 1, 1 / 3, 2 / 3, 1, 1 / 3])
    plain = _constant_scheduler()
    apply_round_restarts(plain, BoostConfig(steps_per_round=3, rewarmup_steps=2, lr_restart="none"))
    assert _lrs(plain, 5) == [1.0] * 5


def test_set_scheduler_step_matches_stepping():
    a, b = _constant_scheduler(), _constant_scheduler()
    for s in (a, b):
        apply_round_restarts(s, BoostConfig(steps_per_round=4, rewarmup_steps=2))
    _lrs(a, 9)
    set_scheduler_step(b, 9)
    assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"] == pytest.approx(2 / 3)  # step 9 = 2nd step of round 2
