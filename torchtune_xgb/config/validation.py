"""Config checks that run before any weights load; each failure is one line naming the key."""

from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config as tt_config
from torchtune.modules.peft import LoRALinear

from torchtune_xgb.config.boost_config import AdapterConfig, BoostConfig
from torchtune_xgb.config.checks import check_run_config, positive_int
from torchtune_xgb.config.component_args import check_component_args
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.eval.periodic import validate_periodic_eval_config
from torchtune_xgb.eval.validation import validate_eval_config
from torchtune_xgb.export.adapter import adapter_only
from torchtune_xgb.export.config import parse_export_config
from torchtune_xgb.models.prepare import check_prepared
from torchtune_xgb.run.base_fingerprint import base_checkpoint_files
from torchtune_xgb.run.checkpointing import ResumeCheckpoint, resume_root, select_resume_checkpoint, step_dirs
from torchtune_xgb.run.guard import GuardConfig
from torchtune_xgb.run.identity import check_resume_identity, run_identity

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
DTYPES = ("fp32", "bf16")


def _existing(path: Any, key: str, kind: str = "file") -> Path:
    if path is None:
        raise ConfigError(f"{key}: missing")
    p = Path(str(path)).expanduser()
    ok = p.is_dir() if kind == "dir" else p.is_file()
    if not ok:
        raise ConfigError(f"{key}: {kind} not found: {p}")
    return p


def _block(cfg: DictConfig, key: str) -> dict:
    block = cfg.get(key)
    if block is None:
        return {}
    if not isinstance(block, DictConfig):
        raise ConfigError(f"{key}: must be a mapping of keys, got {block!r}")
    return OmegaConf.to_container(block, resolve=True)


def validate_config(cfg: DictConfig) -> Tuple[BoostConfig, AdapterConfig]:
    """Check ``cfg`` for the XGBLoRA recipe; return the parsed ``boost`` and ``adapter`` blocks.

    Raises ConfigError (one line, starting with the config key) on the first problem. Builds the
    model on the meta device to check its adapters and block count; loads no weights.
    """
    check_run_config(cfg)
    boost = BoostConfig.from_mapping(_block(cfg, "boost"))
    adapter = AdapterConfig.from_mapping(_block(cfg, "adapter"))
    GuardConfig.from_mapping(_block(cfg, "guard"))
    for key in ("output_dir", "model", "checkpointer", "tokenizer", "optimizer", "lr_scheduler", "dataset"):
        if OmegaConf.select(cfg, key) is None:
            raise ConfigError(f"{key}: missing")
    if cfg.get("dtype") not in DTYPES:
        raise ConfigError(f"dtype: must be one of {DTYPES}, got {cfg.get('dtype')!r}")
    for key in ("epochs", "batch_size", "gradient_accumulation_steps"):
        positive_int(cfg, key)
    for key in ("max_steps_per_epoch", "save_every_n_steps", "log_every_n_steps"):
        positive_int(cfg, key, optional=True)
    check_component_args(cfg)  # every _component_ block's keys against its builder's signature
    validate_periodic_eval_config(cfg)  # dataset_val, run_val_every_n_steps, batch_size_val
    parse_export_config(cfg)  # export.adapter_rank
    adapter_only(cfg)  # save_adapter_weights_only: with the HF checkpointer
    validate_eval_config(cfg)  # the eval: block, the user's eval file, generated data never over user files

    model = cfg.model
    rank = model.get("lora_rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"model.lora_rank: must be an integer ≥ 1, got {rank!r}")
    dropout = model.get("lora_dropout")
    if dropout is not None and not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        raise ConfigError(f"model.lora_dropout: must be a number in [0, 1), got {dropout!r}")
    alpha = model.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ConfigError(f"model.lora_alpha: must be a number > 0, got {alpha!r}")
    for key, model_value in (("rank", rank), ("alpha", alpha)):
        value = getattr(adapter, key)
        if value is not None and value != model_value:
            raise ConfigError(
                f"adapter.{key}: {value!r} differs from model.lora_{key} {model_value!r}; the model key is the one used"
            )
    targets = model.get("lora_attn_modules")
    if not isinstance(targets, (list, ListConfig)):
        raise ConfigError(f"model.lora_attn_modules: must be a list, got {targets!r}")
    for target in targets:
        if target not in ATTN_MODULES:
            raise ConfigError(f"model.lora_attn_modules: unknown target module {target!r} (known: {', '.join(ATTN_MODULES)})")
    if not targets and not model.get("apply_lora_to_mlp") and not model.get("apply_lora_to_output"):
        raise ConfigError("model.lora_attn_modules: empty and apply_lora_to_mlp is False: nothing to adapt")
    if model.get("quantize_base") and cfg.get("dtype") != "bf16":
        raise ConfigError("dtype: NF4 bases (model.quantize_base: True) need dtype: bf16")
    if model.get("use_dora"):
        raise ConfigError("model.use_dora: XGBLoRA merges plain LoRA updates; DoRA is not supported")

    ckpt = cfg.checkpointer
    check_prepared(ckpt.get("checkpoint_dir"))  # a model missing from the cache: how to prepare it
    _existing(ckpt.get("checkpoint_dir"), "checkpointer.checkpoint_dir", "dir")
    for path in base_checkpoint_files(ckpt):  # a list, or torchtune's {filename_format, max_filename}
        _existing(path, "checkpointer.checkpoint_files")
    tok_path = cfg.tokenizer.get("path")
    if tok_path is not None:
        _existing(tok_path, "tokenizer.path")
    if cfg.get("resume_from_checkpoint") and not step_dirs(cfg.output_dir):
        raise ConfigError(f"resume_from_checkpoint: no checkpoint under {resume_root(cfg.output_dir)}")

    # Build on the meta device: no memory, no weights, but the real module tree.
    try:
        with torch.device("meta"):
            # same module tree without NF4 (no quantization is needed to check the config)
            meta_model = tt_config.instantiate(model, **({"quantize_base": False} if model.get("quantize_base") else {}))
    except Exception as err:  # a builder rejecting its arguments
        raise ConfigError(f"model: could not build {model.get('_component_')}: {err}".replace("\n", " ")) from err
    if not any(isinstance(m, LoRALinear) for m in meta_model.modules()):
        raise ConfigError(
            f"model._component_: {model.get('_component_')} has no LoRALinear modules; use a torchtune lora_* builder"
        )
    num_blocks = len(getattr(meta_model, "layers", []))
    if num_blocks:
        boost.blocks_per_round_count(num_blocks)
    if adapter.method == "loraxs":
        too_small = [n for n, m in meta_model.named_modules() if isinstance(m, LoRALinear) and min(m.in_dim, m.out_dim) < rank]
        if too_small:
            raise ConfigError(f"model.lora_rank: {rank} exceeds min(out, in) of {too_small[0]}")
    return boost, adapter


def validate_resume(
    cfg: DictConfig, world_size: Optional[int] = 1, identity: Optional[dict] = None
) -> Optional[ResumeCheckpoint]:
    """With ``resume_from_checkpoint``: the intact checkpoint to resume from, after checking that
    the config defines the same run as the one that wrote it (run_identity.py). None otherwise.

    ``world_size``: the run's number of processes; None: the checkpoint's (not checked).
    ``identity``: the config's :func:`run_identity`, if the caller already has it (it hashes the
    dataset's local files). Raises one-line errors: ConfigError for no checkpoint or a changed config, RunError when no
    checkpoint is intact. Reads only the small manifests and checksums, no weights."""
    if not cfg.get("resume_from_checkpoint"):
        return None
    checkpoint = select_resume_checkpoint(cfg.output_dir)
    if checkpoint is None:
        raise ConfigError(f"resume_from_checkpoint: no checkpoint under {resume_root(cfg.output_dir)}")
    allowed = cfg.get("resume_allow_changes") or []
    if not isinstance(allowed, (list, ListConfig)):
        raise ConfigError(f"resume_allow_changes: must be a list of config keys, got {allowed!r}")
    if world_size is None:  # tune-xgb validate: the launch decides the number of processes
        world_size = checkpoint.run.get("world_size", 1)
    current = identity if identity is not None else run_identity(cfg, world_size)
    check_resume_identity(checkpoint.run, current, [str(k) for k in allowed], checkpoint.path)
    return checkpoint
