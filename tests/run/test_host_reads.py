"""Host reads per optimizer step (each one a synchronisation on a GPU), counted, not timed.

Both recipes run their own ``train()`` in this process on the tiny model, the same config, data
and batches, under :class:`tests.host_reads.HostReads`; the reads between two ``prof.step()``
calls (each recipe calls it once per step, after logging) are that step's. torchtune's LoRA recipe
reads its loss once per step (``running_loss.item()``) and a second time where its progress bar
formats ``loss_to_log`` (still a tensor: ``item() / num_tokens``), two more at logged steps (the
metric logger formats the loss and tokens/s tensors). XGBLoRA reads everything its guard needs in
one transfer; a step whose round is merged or that is saved or exported reads its update ratio at
once (run/guard.py), a second read.
"""

import collections

import torch
from omegaconf import OmegaConf

from tests.e2e_fixture import tiny_config
from tests.host_reads import HostReads
from torchtune_xgb.torchtune_recipes import load_recipe_module


def test_the_counter_counts_reads_of_device_values_only():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    batch = {"x": torch.ones(2, 3)}
    with HostReads(model) as reads:
        batch = {k: v.to(torch.device("cpu")) for k, v in batch.items()}  # a recipe's batch_to_device
        loss = model(batch["x"]).sum()
        loss.backward()
        optimizer.step()  # Adam reads its step counters, host values: not counted
        assert reads.count == 0
        float(loss.detach())
        torch.stack([loss.detach(), loss.detach()]).tolist()  # one transfer, however many values
        f"{loss:.2f}"
        bool((batch["x"] > 0).any())
        assert reads.count == 4
        torch.randperm(4).tolist()  # a sampler's permutation: host values
        torch.tensor(3.0, device="cpu").item()  # "cpu" as a string: code that means the host
        assert reads.count == 4
        torch.tensor([1.0], device=torch.device("cpu")).item()  # the recipe's device: a device value
        batch["x"][batch["x"] > 0]  # boolean-mask indexing: the host waits for the size
    assert reads.count == 6
    ops = [w.split(" at ")[0] for w in reads.where]
    assert ops == ["_local_scalar_dense", "tolist"] + ["_local_scalar_dense"] * 3 + ["index"]
    assert all(w.split(" at ")[1].startswith("test_host_reads.py:") for w in reads.where)  # where they were asked for


class _StepMarks:
    """Stands in for the recipe's profiler: ``step()`` (once per optimizer step) records the reads so far."""

    def __init__(self, reads: HostReads):
        self.reads, self.marks = reads, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def step(self):
        self.marks.append(list(self.reads.where))

    def per_step(self):
        """{step: Counter of "op at file:line"} of the reads in each step."""
        bounds = [0] + [len(m) for m in self.marks]
        return {s: collections.Counter(self.marks[-1][bounds[s - 1]:bounds[s]]) for s in range(1, len(self.marks) + 1)}


def _reads_per_step(recipe_class, cfg):
    recipe = recipe_class(cfg=cfg)
    recipe.setup(cfg=cfg)
    reads = HostReads(recipe._model)
    recipe._profiler = marks = _StepMarks(reads)
    with reads:
        recipe.train()
    return marks.per_step()


def test_a_step_reads_the_host_no_more_than_torchtunes_lora_step(root, tmp_path):
    import xgblora_finetune

    def config(name):
        # 6 steps, κ = 4 (a merge after step 4), saved at 3 and 6, logged at even steps; no eval
        raw = tiny_config(root, tmp_path / name, max_steps_per_epoch=6, log_every_n_steps=2)
        raw.pop("eval")
        return OmegaConf.create(raw)

    torchtune_lora = load_recipe_module("lora_finetune_single_device").LoRAFinetuneRecipeSingleDevice
    theirs = _reads_per_step(torchtune_lora, config("torchtune"))
    ours = _reads_per_step(xgblora_finetune.XGBLoRAFinetuneRecipeSingleDevice, config("xgblora"))
    assert sorted(theirs) == sorted(ours) == list(range(1, 7))
    assert [sum(theirs[s].values()) for s in range(1, 7)] == [2, 4, 2, 4, 2, 4], theirs
    for step in (1, 2, 5):  # neither merged, saved nor exported
        assert sum(ours[step].values()) == 1 <= sum(theirs[step].values()) + 1, (step, ours[step])
    # the save at 3, the merge at 4, the save and export at 6 read the step's update ratio at once;
    # their other reads are the save's and the merge's own
    for step in (3, 4, 6):
        from_the_step = {w: n for w, n in ours[step].items() if " at loop.py:" in w}
        assert sum(from_the_step.values()) == 2, (step, ours[step])
