"""A resume on another number of processes: exact (the same samples in every step) or refused
before anything loads; the loaded data (size, steps per epoch, a hub dataset's revision) is the
data the run trained on.

In process and cheap: torchdata's real sampler and a real DataLoader stand in for the recipes'
data pipeline; the identity checks run on checkpoints written by ``save_resume_state``. The
end-to-end version (one process killed, resumed on two) is in tests/distributed/test_distributed.py.
"""

import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from tests.e2e_fixture import tiny_config
from torchtune_xgb.config.validation import validate_resume
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.run import checkpointing
from torchtune_xgb.run.batch_layout import SAMPLES_KEY, rank_position, steps_per_epoch
from torchtune_xgb.run.data_identity import check_loaded_data, loaded_data_identity
from torchtune_xgb.run.identity import REVISIONS_KEY, STEPS_KEY, run_identity


def _loaders(samples: int, world_size: int, batch_size: int):
    """One (sampler, DataLoader) per rank, built as torchtune's recipes build them."""
    out = []
    for rank in range(world_size):
        sampler = StatefulDistributedSampler(list(range(samples)), num_replicas=world_size, rank=rank, shuffle=True, seed=0)
        out.append((sampler, DataLoader(list(range(samples)), batch_size=batch_size, sampler=sampler, drop_last=True)))
    return out


def _steps(samples, world_size, batch_size, accumulation, epochs, resume_at=None):
    """The sample ids each optimizer step trains on, over all ranks and micro-batches, sorted.
    ``resume_at``: (epoch, steps done): positioned as the recipe's ``train`` does on resume."""
    loaders = _loaders(samples, world_size, batch_size)
    per_epoch = len(loaders[0][1]) // accumulation
    first_epoch, done = resume_at or (0, 0)
    steps = []
    for epoch in range(first_epoch, epochs):
        iters = []
        for sampler, loader in loaders:
            sampler.set_epoch(epoch)
            if done:
                sampler.load_state_dict({"yielded": rank_position(done, batch_size * world_size * accumulation, world_size)})
            iters.append(iter(loader))
        for _ in range(done, per_epoch):
            steps.append(sorted(int(i) for it in iters for _ in range(accumulation) for i in next(it)))
        done = 0
    return steps


@pytest.mark.parametrize("world_size,batch_size,accumulation", [(2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)])
def test_a_resume_on_another_split_of_the_global_batch_trains_on_the_same_samples_in_every_step(world_size, batch_size, accumulation):
    # 66 samples, global batch 4: 16 steps per epoch on each of these layouts (the last 2 samples unused)
    uninterrupted = _steps(66, 1, 4, 1, epochs=2)
    assert len(uninterrupted) == 32 and len({i for s in uninterrupted[:16] for i in s}) == 64
    assert uninterrupted[16:] != uninterrupted[:16]  # each epoch its own permutation
    # killed after step 21 (epoch 1, 5 steps done), resumed on the other layout
    resumed = _steps(66, world_size, batch_size, accumulation, epochs=2, resume_at=(1, 5))
    assert resumed == uninterrupted[21:]
    # each step holds distinct samples: nothing is repeated or skipped within the epoch's steps
    assert len({i for s in resumed[:11] for i in s}) == 44


@pytest.mark.parametrize("samples", [64, 66, 67, 7, 9])
@pytest.mark.parametrize("world_size,batch_size,accumulation", [(1, 4, 1), (2, 2, 1), (2, 1, 2), (3, 1, 2), (4, 1, 1)])
def test_steps_per_epoch_as_torchtunes_data_loader_counts_them(samples, world_size, batch_size, accumulation):
    loader = _loaders(samples, world_size, batch_size)[0][1]
    expected = len(loader) // accumulation  # the recipes' count
    assert steps_per_epoch(samples, world_size, batch_size, accumulation, None) == expected
    assert steps_per_epoch(samples, world_size, batch_size, accumulation, 3) == min(expected, 3)


# --- refused before anything loads ------------------------------------------------------------


def _checkpoint(root: Path, name: str, samples=64, recorded=True, **overrides):
    """A resume checkpoint of a one-process run of the tiny config (``overrides`` on top), with
    the identity entries a run records once its data has loaded (``recorded=False``: an older
    version's checkpoint, without them). Returns its config, set to resume."""
    out = root / name
    cfg = OmegaConf.create(tiny_config(root, out, **overrides))
    identity = run_identity(cfg, world_size=1)
    if recorded:
        identity.update({SAMPLES_KEY: samples, STEPS_KEY: 16})
    checkpointing.save_resume_state(str(out), 21, {"x": torch.zeros(1)}, run=identity)
    cfg.resume_from_checkpoint = True
    return cfg


def _resume(cfg, world_size, *overrides):
    changed = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return validate_resume(changed, world_size, run_identity(changed, world_size))


def test_more_processes_with_the_same_global_batch_resume(root):
    cfg = _checkpoint(root, "same_global", max_steps_per_epoch=None)
    chosen = _resume(cfg, 2, "batch_size=2", "resume_allow_changes=[world_size]")
    assert chosen.path.name == "step_00000021"
    assert _resume(cfg, 2, "gradient_accumulation_steps=2", "batch_size=1", "resume_allow_changes=[world_size]")


def test_more_processes_with_the_same_per_rank_batch_are_refused_naming_the_global_batch(root):
    # the run: 2 epochs × 16 steps at batch 4 on one process, resumed on two processes
    cfg = _checkpoint(root, "doubled", epochs=2, max_steps_per_epoch=None)
    with pytest.raises(ConfigError) as err:
        _resume(cfg, 2, "resume_allow_changes=[world_size]")
    assert str(err.value) == (
        "resume_allow_changes: world_size 1 → 2 changes the global batch 4 → 8 "
        "(batch_size × processes × gradient_accumulation_steps): set batch_size=2 to keep 4"
    )
    with pytest.raises(ConfigError, match=r"global batch 4 → 6 .*: no batch_size × gradient_accumulation_steps on 3 processes"):
        _resume(cfg, 3, "batch_size=2", "resume_allow_changes=[world_size]")


def test_another_split_that_changes_the_steps_per_epoch_is_refused(root):
    # 67 samples: 16 steps of 4 on one process; two ranks pad to 68 and take 17 steps of 2 + 2
    cfg = _checkpoint(root, "padded", samples=67, max_steps_per_epoch=None)
    with pytest.raises(ConfigError) as err:
        _resume(cfg, 2, "batch_size=2", "resume_allow_changes=[world_size]")
    assert str(err.value) == (
        "resume_allow_changes: world_size 1 → 2, batch_size 4 → 2 changes the steps per epoch 16 → 17 "
        "(67 samples padded to a multiple of the processes): resume with world_size=1, batch_size=4, gradient_accumulation_steps=1"
    )
    # max_steps_per_epoch caps both at 12: the same steps, the same samples
    capped = _checkpoint(root, "padded_capped", samples=67, max_steps_per_epoch=12)
    assert _resume(capped, 2, "batch_size=2", "resume_allow_changes=[world_size]")


def test_a_checkpoint_without_its_dataset_size_resumes_only_on_its_own_layout(root):
    cfg = _checkpoint(root, "old", recorded=False)
    with pytest.raises(ConfigError, match=r"^resume_allow_changes: world_size 1 → 2, batch_size 4 → 2: the checkpoint does not record"):
        _resume(cfg, 2, "batch_size=2", "resume_allow_changes=[world_size]")
    assert _resume(cfg, 1)  # on its own layout: as before


def test_another_number_of_processes_without_resume_allow_changes_is_refused_with_the_hint(root):
    cfg = _checkpoint(root, "unlisted")
    with pytest.raises(ConfigError) as err:
        _resume(cfg, 2, "batch_size=2")
    message = str(err.value)
    assert "batch_size (checkpoint 4, now 2), world_size (checkpoint 1, now 2)" in message
    assert message.endswith("to change them on purpose: resume_allow_changes=[world_size]")


def test_the_per_rank_batch_alone_never_changes_without_world_size_listed(root):
    cfg = _checkpoint(root, "batch_only")
    with pytest.raises(ConfigError, match=r"batch_size \(checkpoint 4, now 2\), gradient_accumulation_steps"):
        _resume(cfg, 1, "batch_size=2", "gradient_accumulation_steps=2")


# --- the loaded data: size, steps per epoch, a hub dataset's resolved revision ---------------------


def _plant_hub_dataset(cache: Path, repo: str, commit: str, rows: int) -> None:
    """A hub dataset as ``datasets`` caches one it resolved to ``commit`` (no network)."""
    from datasets import DatasetInfo, Features, Value
    from datasets.arrow_writer import ArrowWriter
    from datasets.splits import SplitDict, SplitInfo

    owner, name = repo.split("/")
    directory = cache / f"{owner}___{name}" / "default" / "0.0.0" / commit
    directory.mkdir(parents=True)
    features = Features({k: Value("string") for k in ("instruction", "input", "output")})
    with ArrowWriter(features=features, path=str(directory / f"{name}-train.arrow")) as writer:
        for i in range(rows):
            writer.write({"instruction": f"{i} + 1", "input": "", "output": str(i + 1)})
        count, size = writer.finalize()
    splits = SplitDict({"train": SplitInfo(name="train", num_examples=count, num_bytes=size, dataset_name=name)})
    DatasetInfo(dataset_name=name, config_name="default", features=features, splits=splits).write_to_directory(str(directory))


def _load_alpaca(cache: Path, source: str = "someone/sums"):
    from torchtune.datasets import alpaca_dataset

    block = {"source": source, "split": "train", "cache_dir": str(cache)}
    return block, alpaca_dataset(None, **block)


def test_a_new_revision_of_a_hub_dataset_is_refused_once_it_loads(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # offline: the newest cached revision loads
    cache = tmp_path / "hf_datasets"
    _plant_hub_dataset(cache, "someone/sums", "a" * 40, rows=6)
    block, dataset = _load_alpaca(cache)
    trained = loaded_data_identity(block, dataset, steps_per_epoch=1)
    assert trained == {SAMPLES_KEY: 6, STEPS_KEY: 1, REVISIONS_KEY: ["someone/sums@" + "a" * 40]}
    check_loaded_data(trained, loaded_data_identity(*_load_alpaca(cache), steps_per_epoch=1), Path("ckpt"))  # the same
    time.sleep(0.01)  # a newer cache directory: what datasets now resolves
    _plant_hub_dataset(cache, "someone/sums", "b" * 40, rows=6)
    now = loaded_data_identity(*_load_alpaca(cache), steps_per_epoch=1)
    with pytest.raises(ConfigError) as err:
        check_loaded_data(trained, now, Path("ckpt"))
    assert str(err.value) == (
        "dataset: the data loaded now differs from what the run that wrote ckpt trained on "
        f"(hub revisions ['someone/sums@{'a' * 40}'] → ['someone/sums@{'b' * 40}']); a resume continues only on the "
        "same data (for a hub dataset: the same revision); start a new run in another output_dir for this data"
    )


def test_a_dataset_of_another_size_is_refused_and_local_files_record_no_revision(tmp_path):
    from torchtune.datasets import ConcatDataset, alpaca_dataset

    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"instruction": "{i}", "input": "", "output": "{i}"}}\n' for i in range(5)))
    block = {"source": "json", "data_files": str(data), "split": "train", "cache_dir": str(tmp_path / "c")}
    both = ConcatDataset([alpaca_dataset(None, **block), alpaca_dataset(None, **block)])
    trained = loaded_data_identity([block, block], both, steps_per_epoch=2)
    assert trained == {SAMPLES_KEY: 10, STEPS_KEY: 2}  # local files: hashed before anything loads (identity.py)
    data.write_text(data.read_text() * 2)
    grown = ConcatDataset([alpaca_dataset(None, **block), alpaca_dataset(None, **block)])
    with pytest.raises(ConfigError, match=r"\(samples 10 → 20; steps per epoch 2 → 5\)"):
        check_loaded_data(trained, loaded_data_identity([block, block], grown, steps_per_epoch=5), Path("ckpt"))
    check_loaded_data({}, trained, Path("ckpt"))  # a checkpoint from before these were recorded: nothing to compare
