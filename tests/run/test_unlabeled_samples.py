"""Samples whose prompt fills ``max_seq_len`` (``train_on_input=False``): no label token is left.

Their micro-batches add nothing to the loss or the gradient, a step made only of them applies no
update and is counted (``skipped_steps``), and the run finishes. Before: the chunked loss's 0/0
made the step's loss NaN and the guard stopped a healthy run as "diverged" (batch 1: a
ZeroDivisionError). The data is a JSON chat file of the test's own, read by torchtune's
``chat_dataset`` with the tiny model's tokenizer (``max_seq_len`` 64; e2e_fixture.chat_config).
Under FSDP: tests/distributed/test_distributed.py.
"""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.e2e_fixture import EXPORT, chat, chat_config, read_metric, run_recipe
from torchtune_xgb.torchtune_recipes import load_recipe_module


def test_masked_micro_batches_add_nothing_and_the_other_steps_equal_torchtunes_lora(root, tmp_path):
    """Batch 1 × 2 micro-batches, in file order. Sample 2 is long: step 2 has one empty micro-batch
    (torchtune logs its loss as NaN; its update is right). Samples 8 and 9 are long: step 5 has no
    label token at all; torchtune would scale by 1/0 there, so it runs on the file without them.
    XGBLoRA without ``boost`` is LoRA in one round; torchtune's adapter gets XGBLoRA's initial A,
    and the learning rate is constant (the skipped step still counts for the schedule)."""
    import xgblora_finetune

    chats = [chat(i, long=i in (2, 8, 9)) for i in range(16)]

    def config(name, data, steps):
        raw = chat_config(root, tmp_path / name, data, max_steps_per_epoch=steps, batch_size=1,
                          gradient_accumulation_steps=2, shuffle=False)
        del raw["boost"]
        raw["lr_scheduler"].update(num_warmup_steps=0, num_cycles=0.0)  # cosine with 0 cycles: constant
        return OmegaConf.create(raw)

    cfg = config("xgblora", chats, 8)
    ours = xgblora_finetune.XGBLoRAFinetuneRecipeSingleDevice(cfg=cfg)
    ours.setup(cfg=cfg)
    initial = {k: v.clone() for k, v in ours._model.state_dict().items() if ".lora_" in k}
    ours.train()

    cfg = config("torchtune", [c for i, c in enumerate(chats) if i not in (8, 9)], 7)
    theirs = load_recipe_module("lora_finetune_single_device").LoRAFinetuneRecipeSingleDevice(cfg=cfg)
    theirs.setup(cfg=cfg)
    with torch.no_grad():
        state = theirs._model.state_dict()
        for key, value in initial.items():
            state[key].copy_(value)
    theirs.train()

    got, reference = read_metric(tmp_path / "xgblora", "loss"), read_metric(tmp_path / "torchtune", "loss")
    assert sorted(got) == [1, 2, 3, 4, 6, 7, 8] and all(math.isfinite(v) for v in got.values())  # step 5: no loss
    assert math.isnan(reference[2])
    for step, their_step in [(1, 1), (3, 3), (4, 4), (6, 5), (7, 6), (8, 7)]:
        assert got[step] == pytest.approx(reference[their_step], rel=1e-5), step
    assert read_metric(tmp_path / "xgblora", "skipped_steps") == {5: 1.0}
    summary = json.loads((tmp_path / "xgblora" / "xgb_summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8


def test_a_batch_1_run_with_unlabeled_samples_finishes_and_counts_them(root, tmp_path):
    """One sample per step: each long one is a step without label tokens (before: ZeroDivisionError)."""
    out = tmp_path / "out"
    cfg = chat_config(root, out, [chat(i, long=i in (1, 5, 6, 10)) for i in range(12)], batch_size=1, max_steps_per_epoch=12)
    result = run_recipe(cfg, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stderr + result.stdout).splitlines() if "dataset: " in line]
    assert len(lines) == 1 and lines[0].endswith(
        "dataset: 4 of 12 samples lose all their label tokens to tokenizer.max_seq_len=64 (the prompt fills it): they "
        "add nothing to the loss or the gradient, and a step made only of them applies no update (counted as skipped_steps)")
    losses, skipped = read_metric(out, "loss"), read_metric(out, "skipped_steps")
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses.values())
    assert sorted(skipped.values()) == [1, 2, 3, 4] and not set(skipped) & set(losses)
    assert sorted(set(skipped) | set(losses)) == list(range(1, 13))
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["skipped_steps"] == 4 and summary["steps"] == 12 and math.isfinite(summary["final_loss"])
    assert (out / EXPORT).is_file()
