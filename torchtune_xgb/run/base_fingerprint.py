"""Which base weights a run was built on, so a resume cannot continue on different ones.

A resume checkpoint holds only what cannot be recomputed (ledgers, live adapters, optimizer); the
base weights W0 are read again from ``checkpointer.checkpoint_dir``. If those files changed in
between (a re-download of a newer revision, another model copied into the same directory, a
merged model saved over its own base), the resumed run would add the saved updates to other
weights and finish "successfully" with a model that was never trained. The run's identity
therefore records a fingerprint of every base file (and of the directory's ``config.json``), and a
resume compares it before any weights load.

The fingerprint is the file's size and the sha256 of its first MiB (a safetensors header names
every tensor, its dtype, shape and offset), its last MiB and ``SAMPLES`` evenly spaced 64 KiB
blocks: under 6 MiB read per file whatever its size (a bound on the reads; its time on a large
base was not measured). It catches a replaced, re-downloaded, re-quantised or merged-over file; an edit
confined to bytes between the samples (one hand-changed tensor) is not caught, and a copy with
other timestamps but the same bytes is correctly the same base.
"""

import hashlib
from pathlib import Path
from typing import Any, Dict, List

from torchtune.training.checkpointing._utils import FormattedCheckpointFiles

from torchtune_xgb.errors import ConfigError

HEAD = TAIL = 1 << 20
SAMPLES = 64
SAMPLE_BYTES = 64 << 10


def base_checkpoint_files(checkpointer: Any) -> List[Path]:
    """The base weight files a ``checkpointer:`` block names: ``checkpoint_files`` as a list, or
    torchtune's ``{filename_format, max_filename}`` form expanded the way torchtune expands it."""
    ckpt_dir = Path(str(checkpointer.get("checkpoint_dir"))).expanduser()
    return [ckpt_dir / name for name in _names(checkpointer)]


def _names(checkpointer: Any) -> List[str]:
    files = checkpointer.get("checkpoint_files")
    if files is None:
        return []
    if hasattr(files, "keys"):  # dict or DictConfig
        try:
            return FormattedCheckpointFiles.from_dict(dict(files)).build_checkpoint_filenames()
        except ValueError as err:
            raise ConfigError(f"checkpointer.checkpoint_files: {err}") from None
    return [files] if isinstance(files, str) else [str(name) for name in files]


def sampled_fingerprint(path: Path) -> str:
    """``size:sha256`` of the first and last MiB and ``SAMPLES`` evenly spaced 64 KiB blocks."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= HEAD + TAIL + SAMPLES * SAMPLE_BYTES:  # small: every byte
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        else:
            offsets = [0] + [HEAD + i * (size - HEAD - TAIL) // SAMPLES for i in range(SAMPLES)] + [size - TAIL]
            lengths = [HEAD] + [SAMPLE_BYTES] * SAMPLES + [TAIL]
            for offset, length in zip(offsets, lengths):
                f.seek(offset)
                digest.update(f.read(length))
    return f"{size}:{digest.hexdigest()}"


# Not weights, but part of the model: torchtune's HF checkpointer reads the head counts and sizes
# from it to convert q/k weights (another config.json over the same weights is another model),
# and the merged export carries it. Checkpoints written before it was recorded do not compare it.
MODEL_CONFIG = "config.json"


def base_fingerprints(checkpointer: Any) -> Dict[str, str]:
    """``{file name: fingerprint}`` of every base file that exists, and of ``config.json`` when the
    directory has one (a missing weight file is reported by the config checks, which name the key)."""
    ckpt_dir = Path(str(checkpointer.get("checkpoint_dir"))).expanduser()
    names = _names(checkpointer) + ([MODEL_CONFIG] if (ckpt_dir / MODEL_CONFIG).is_file() else [])
    return {name: sampled_fingerprint(ckpt_dir / name) for name in dict.fromkeys(names) if (ckpt_dir / name).is_file()}
