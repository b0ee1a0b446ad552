"""Config checks beyond the ``boost:``/``adapter:`` blocks, run before any weights load.

Each failure is one line naming the key:

- unknown top-level keys: a typo such as ``save_every_n_step=1`` would otherwise be ignored (and
  that one silently writes no resume state). A key that other values interpolate (``${model_dir}``)
  is a helper variable, not a typo, and is accepted;
- every float anywhere in the config is finite (YAML's ``.nan``/``.inf`` parse as floats);
- ``device``: a CUDA device that this machine does not have (torchtune would fall back or fail
  late), and ``boost.base_device`` likewise;
- optimizer learning rate, weight decay, betas and eps, ``clip_grad_norm`` in range;
- local dataset files (``dataset.data_files``, ``dataset_val.data_files``, in a block or each of
  torchtune's list of blocks) exist.
"""

import difflib
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from torchtune_xgb.errors import ConfigError

# Top-level keys torchtune 0.6.1's LoRA recipes (single device and distributed) read.
TORCHTUNE_KEYS = {
    "output_dir", "model", "tokenizer", "checkpointer", "resume_from_checkpoint", "save_adapter_weights_only",
    "dataset", "seed", "shuffle", "batch_size", "optimizer", "lr_scheduler", "loss", "epochs",
    "max_steps_per_epoch", "gradient_accumulation_steps", "clip_grad_norm", "compile", "device", "dtype",
    "enable_activation_checkpointing", "enable_activation_offloading", "metric_logger", "log_every_n_steps",
    "log_peak_memory_stats", "log_level", "profiler", "collate_fn", "low_cpu_ram", "cudnn_deterministic_mode",
    "custom_sharded_layers", "fsdp_cpu_offload", "fsdp_reshard_after_forward",
}
# Top-level keys the plugin adds to torchtune's: key → (accepted values, default, meaning). The
# documentation's configuration reference is rendered from this table (config/reference.py); the
# keys of the five blocks are defined with their dataclasses (config/keys.py).
PLUGIN_KEYS: Dict[str, Tuple[str, Any, str]] = {
    "boost": ("mapping", None, "The boosting rounds (`boost:` keys below). Without it a run is one round, as in LoRA-XS's paper."),
    "adapter": ("mapping", None, "Which method the rounds train (`adapter:` keys below)."),
    "guard": ("mapping", None, "When a diverging run is stopped (`guard:` keys below)."),
    "export": ("mapping", None, "What the PEFT adapter in `epoch_N/adapter/` holds (`export:` keys below)."),
    "eval": ("mapping", None, "Exact-match evaluation before and after training (`eval:` keys below); leave it out for tasks without exact answers."),
    "dataset_val": (
        "dataset builder block, or a list of them", None,
        "Held-out data scored as metric `val_loss` (token-mean cross-entropy over the whole set), at "
        "`run_val_every_n_steps` and at the final step, or only at the end without it."),
    "run_val_every_n_steps": ("integer ≥ 1 or null", None, "Score `dataset_val` at steps N, 2N, … and at the final step."),
    "batch_size_val": ("integer ≥ 1 or null", None, "Batch size of the `dataset_val` scoring (null: `batch_size`)."),
    "save_every_n_steps": (
        "integer ≥ 1 or null", None,
        "Write a resume checkpoint every N steps (atomic, verified; two kept: the new one and the one "
        "the run continued from); one is always written at the final step, before the export."),
    "overwrite_output_dir": (
        "`true` or `false`", False,
        "Start a new run in a directory that holds another run: removes exactly what that run "
        "recorded writing in `xgb_run.json` (resume state, exports, summary, the metrics log) and "
        "nothing else; refused, before anything is removed, when an input of this run (base, "
        "tokenizer, data, eval file) lies inside what would go, or when the directory holds what "
        "this run would write but no run recorded (another tool's or an older version's `epoch_N/`)."),
    "resume_allow_changes": (
        "list of keys", [],
        "Keys a resume (`resume_from_checkpoint=True`) may change on purpose: `optimizer.*`, "
        "`lr_scheduler.*`, `clip_grad_norm`, `world_size`. `world_size` lets the number of processes "
        "change, and `batch_size` and `gradient_accumulation_steps` with it, as long as the global batch "
        "(`batch_size × processes × gradient_accumulation_steps`) and the steps per epoch stay the same: "
        "the resume then continues from the same global sample; anything else is refused in one line "
        "naming the setting that keeps it."),
    "model_dir": ("path", None, "The packaged configs' helper variable: the prepared model's directory."),
}
KNOWN_KEYS = TORCHTUNE_KEYS | set(PLUGIN_KEYS)
_INTERPOLATION = re.compile(r"\$\{\s*([A-Za-z_][\w]*)")


def _leaves(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain container (``resolve=False``: interpolations
    stay strings such as ``${model_dir}/x``)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, node


def positive_int(cfg: DictConfig, key: str, optional: bool = False) -> Optional[int]:
    """The integer ≥ 1 at ``key`` (None if absent and ``optional``); else a one-line ConfigError."""
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}: must be an integer ≥ 1, got {value!r}")
    return value


def check_top_level_keys(cfg: DictConfig) -> None:
    referenced = set()
    for _, raw in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(raw, str):
            referenced.update(_INTERPOLATION.findall(raw))
    for key in cfg.keys():
        if key in KNOWN_KEYS or key in referenced:
            continue
        close = difflib.get_close_matches(str(key), sorted(KNOWN_KEYS), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(
            f"{key}: unknown top-level key{hint}; the recipe would ignore it (a helper variable must be used as ${{{key}}})"
        )


def check_finite_floats(cfg: DictConfig) -> None:
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")


def check_device(key: str, value: Any) -> None:
    """A device string that this machine can use (CUDA devices must exist)."""
    import torch  # here: the configuration reference reads this module's key table without torch

    try:
        device = torch.device(str(value))
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"{key}: not a device: {value!r} (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"{key}: {value!r} requested but {why}; use {key}=cpu or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {value!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type not in ("cpu", "cuda", "npu", "xpu", "mps"):
        raise ConfigError(f"{key}: unsupported device type {device.type!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_optimizer(cfg: DictConfig) -> None:
    opt = cfg.get("optimizer")
    if opt is None:
        return
    lr = opt.get("lr")
    if lr is not None and not (_number(lr) and lr > 0):
        raise ConfigError(f"optimizer.lr: must be a number > 0, got {lr!r}")
    wd = opt.get("weight_decay")
    if wd is not None and not (_number(wd) and wd >= 0):
        raise ConfigError(f"optimizer.weight_decay: must be a number ≥ 0, got {wd!r}")
    eps = opt.get("eps")
    if eps is not None and not (_number(eps) and eps > 0):
        raise ConfigError(f"optimizer.eps: must be a number > 0, got {eps!r}")
    betas = opt.get("betas")
    if betas is not None and not (
        isinstance(betas, (list, tuple, ListConfig)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"optimizer.betas: must be two numbers in [0, 1), got {betas!r}")
    clip = cfg.get("clip_grad_norm")
    if clip is not None and not (_number(clip) and clip > 0):
        raise ConfigError(f"clip_grad_norm: must be a number > 0 or null, got {clip!r}")
    warmup = OmegaConf.select(cfg, "lr_scheduler.num_warmup_steps")
    if warmup is not None and not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0):
        raise ConfigError(f"lr_scheduler.num_warmup_steps: must be an integer ≥ 0, got {warmup!r}")


def _paths(value: Any) -> Iterable[str]:
    if isinstance(value, (list, tuple, ListConfig)):
        for v in value:
            yield from _paths(v)
    elif isinstance(value, str):
        yield value


# How a local path starts; a Hub dataset id ("org/name") never does.
_LOCAL_PREFIXES = ("/", "./", "../", "~")


def check_dataset_files(cfg: DictConfig, key: str = "dataset") -> None:
    """Local files a torchtune dataset names: ``data_files`` (source json/csv/text/parquet...), in
    one dataset block or in each of torchtune's list of them (``dataset[1].data_files``), and a
    ``source`` written as a local path (``/data/mine``, ``./mine``): load_dataset
    would take a missing one for a Hub id and fail only after the weights load (offline: with a
    hub error that does not name the key)."""
    block = cfg.get(key)
    entries = ([(f"{key}[{i}]", b) for i, b in enumerate(block)] if isinstance(block, ListConfig) else [(key, block)])
    for where, entry in entries:
        if not isinstance(entry, DictConfig):
            continue
        for path in _paths(entry.get("data_files")):
            if "://" in path or any(ch in path for ch in "*?["):
                continue  # a remote URL or a glob: the dataset library resolves it
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"{where}.data_files: file not found: {path}")
        source = entry.get("source")  # (not data_dir: our generated datasets create theirs)
        if isinstance(source, str) and source.startswith(_LOCAL_PREFIXES) and not Path(source).expanduser().exists():
            raise ConfigError(f"{where}.source: no such file or directory: {source}")


def check_run_config(cfg: DictConfig) -> None:
    """All checks of this module, in order."""
    check_top_level_keys(cfg)
    check_finite_floats(cfg)
    check_device("device", cfg.get("device", "cpu"))
    check_optimizer(cfg)
    check_dataset_files(cfg)
    check_dataset_files(cfg, "dataset_val")
