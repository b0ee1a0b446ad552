"""What the training data turned out to be once loaded: its number of samples, the steps of an
epoch, and the revision ``datasets`` resolved for each Hugging Face Hub dataset.

The run identity (identity.py) is taken before anything loads. It fingerprints local data files,
but a hub dataset named by its repo id (``source: tatsu-lab/alpaca``) is whatever revision
``datasets`` resolves when it loads: online the newest commit, offline the newest one in its
cache. A new revision silently changes the data, and with another row count also the steps of an
epoch and the sample a resume continues from. So once the data has loaded, the recipe adds these
values to the identity; every resume checkpoint records them, and a resume compares them right
after its data loads, before any step, and ends with one line on a difference. A ``revision`` in
the dataset block (torchtune's builders pass it on to ``load_dataset``) is part of the config,
compared before anything loads.
"""

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.run.batch_layout import SAMPLES_KEY
from torchtune_xgb.run.identity import BUILDER_NAMES, LOADED_KEYS, REVISIONS_KEY, STEPS_KEY

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # what load_dataset looks up on the hub
_NAMES = {SAMPLES_KEY: "samples", STEPS_KEY: "steps per epoch", REVISIONS_KEY: "hub revisions"}


def hub_source(block: Any) -> Optional[str]:
    """The hub repo id a dataset block's ``source`` names; None for a local file or directory, a
    ``load_dataset`` builder name (``json``), a URL, or no ``source``."""
    source = block.get("source") if isinstance(block, Mapping) else None
    if not isinstance(source, str) or source in BUILDER_NAMES or not _HUB_ID.match(source):
        return None
    return None if Path(source).expanduser().exists() else source


def _hf_datasets(dataset: Any) -> List[Any]:
    """The ``datasets.Dataset`` objects a torchtune dataset reads from: torchtune's SFT, preference
    and text-completion datasets keep theirs as ``_data``, its ``PackedDataset`` wraps ``ds``."""
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        return [dataset]
    inner = [v for k, v in vars(dataset).items() if k in ("_data", "ds")] if hasattr(dataset, "__dict__") else []
    return [d for v in inner for d in _hf_datasets(v)]


def _revision(dataset: Any) -> str:
    """The revision ``datasets`` resolved: its cache directory is named after the hub commit
    (``owner___name/config/version/<commit>``); a dataset held in memory has no cache files, and
    its fingerprint hashes that same directory name."""
    files = dataset.cache_files
    return Path(files[0]["filename"]).parent.name if files else f"fingerprint {dataset._fingerprint}"


def loaded_data_identity(dataset_cfg: Any, dataset: Any, steps_per_epoch: int) -> Dict[str, Any]:
    """The identity entries of the loaded training data: ``dataset_cfg`` is the resolved
    ``dataset`` config (a block, or torchtune's list of blocks, which it concatenates in order),
    ``dataset`` what the recipe built from it."""
    blocks = dataset_cfg if isinstance(dataset_cfg, list) else [dataset_cfg]
    parts = vars(dataset).get("_datasets", [dataset]) if isinstance(dataset_cfg, list) else [dataset]
    revisions = [f"{source}@{_revision(d)}" for block, part in zip(blocks, parts)
                 if (source := hub_source(block)) is not None for d in _hf_datasets(part)]
    identity = {SAMPLES_KEY: len(dataset), STEPS_KEY: steps_per_epoch}
    if revisions:
        identity[REVISIONS_KEY] = revisions
    return identity


def check_loaded_data(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: Path) -> None:
    """Raise a one-line :class:`ConfigError` if the loaded data differs from what the checkpoint's
    run recorded (a checkpoint from before these were recorded: nothing to compare)."""
    changed = [f"{_NAMES[k]} {saved[k]} → {current.get(k)}" for k in LOADED_KEYS if k in saved and saved[k] != current.get(k)]
    if changed:
        raise ConfigError(
            f"dataset: the data loaded now differs from what the run that wrote {checkpoint} trained on "
            f"({'; '.join(changed)}); a resume continues only on the same data "
            "(for a hub dataset: the same revision); start a new run in another output_dir for this data"
        )
