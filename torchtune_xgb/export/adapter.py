"""Every run's update as a standard PEFT LoRA adapter: ``epoch_N/adapter/``.

What a run changed in each adapted module is exactly low-rank: the merged rounds are the ledger
L = U·V (merged_state.py), plus whatever the live adapter still holds (a partial round). So the
whole run is a LoRA whose per-module rank is the ledger's rank (plus r for a live round): no
approximation. A ledger stored dense (once factors would outgrow the matrix) goes through its
exact SVD. The adapter is written as PEFT writes one (``adapter_model.safetensors`` with
``base_model.model.…lora_A.weight`` keys, ``adapter_config.json`` with ``peft_type: LORA``,
``task_type: CAUSAL_LM``, HF module names, ``base_model_name_or_path``), with ``lora_alpha = r``
per module (scale 1: the factors carry every scale), and ``rank_pattern``/``alpha_pattern`` where
modules' ranks differ.

``export.adapter_rank: N`` (optional) keeps each module's top-N singular directions instead
(truncated SVD); the fraction kept, ``1 − ‖L − L_N‖_F / ‖L‖_F`` per module (the same measure as a
merge's ``kept_fraction``), is written into ``adapter/xgb_adapter.json`` and its minimum into the
run summary.

The adapter applies to the base in ``checkpointer.checkpoint_dir``. NF4 runs: with
``adapter.merge_base: original`` base + adapter is exactly the export; with the default
``dequantized`` the adapter applies to the NF4-quantized base (the weights training saw).

Layout: :func:`collect_run_factors` (every rank: FSDP2 gathers) → :func:`lora_factors`
(pure: exact or truncated low-rank form per module) → :func:`peft_adapter` (pure: PEFT keys and
config) → :func:`write_adapter_dir` (rank 0).
"""

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torchtune.models import convert_weights

from torchtune_xgb.distributed.sharding import gather_rows
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.export.config import ExportConfig
from torchtune_xgb.export.fold import clean_name

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_REPORT = "xgb_adapter.json"  # per-module rank and kept fraction (ours, not PEFT's)

Factors = Tuple[torch.Tensor, torch.Tensor]  # (B: out×k, A: k×in), the update is B·A


def adapter_only(cfg: DictConfig) -> bool:
    """torchtune's ``save_adapter_weights_only``: True → ``epoch_N/`` holds the run's whole update
    as the PEFT adapter (``epoch_N/adapter/``) and no merged model (on a large base the merged
    model is the size of the base). It needs the HF checkpointer: PEFT adapters name HF modules."""
    value = cfg.get("save_adapter_weights_only", False)
    if not isinstance(value, bool):
        raise ConfigError(f"save_adapter_weights_only: must be true or false, got {value!r}")
    component = OmegaConf.select(cfg, "checkpointer._component_")
    if value and str(component).rsplit(".", 1)[-1] != "FullModelHFCheckpointer":
        raise ConfigError(
            "save_adapter_weights_only: the run's update is written as a PEFT adapter, which needs "
            f"torchtune.training.FullModelHFCheckpointer (checkpointer._component_ is {component}); "
            "set it to False to export the merged model"
        )
    return value


# --- gathering (every rank) ----------------------------------------------------------------


@torch.no_grad()
def collect_run_factors(booster) -> Dict[str, Any]:
    """Per module: ``(U, V)`` with U·V = the run's whole update (merged rounds + live round), all
    rows, fp32 on the CPU; or ``{"dense": L}`` for a dense ledger. Modules the run never changed
    are left out.

    Under FSDP2 rows are gathered (collectives): call on every rank, in the same order.
    """
    out: Dict[str, Any] = {}
    rate = booster.config.merge_rate
    for name, module in booster.modules.items():
        rows = module.weight.shape[0]  # all ranks' rows (a DTensor's shape is global)
        live = None
        if module.active and module.has_update():  # a partial round, not merged yet
            u, v = module.merge_factors(rate)
            live = gather_rows(u, module.weight, rows).cpu(), v.cpu()
        factors = booster.merged.gathered_factors(name)
        if factors is None:  # dense ledger
            dense = gather_rows(booster.merged.delta(name), module.weight, rows).cpu()
            if live is not None:
                dense = dense + live[0] @ live[1]
            out[name] = {"dense": dense}
            continue
        u, v = factors[0].cpu().float(), factors[1].cpu().float()  # stored bf16 or fp32, exact either way
        if live is not None:
            u, v = torch.cat([u, live[0]], dim=1), torch.cat([v, live[1]], dim=0)
        if u.shape[1]:
            out[name] = (u, v)
    return out


# --- pure transforms -------------------------------------------------------------------------


def _svd_of_product(u: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of U·V (out×k · k×in) from two QRs and a k×k SVD, in fp64: never forms U·V."""
    qu, ru = torch.linalg.qr(u.double())
    qv, rv = torch.linalg.qr(v.double().T)
    small_u, s, small_vh = torch.linalg.svd(ru @ rv.T)
    return qu @ small_u, s, small_vh @ qv.T


def lora_factors(
    updates: Mapping[str, Any], max_rank: Optional[int] = None
) -> Tuple[Dict[str, Factors], Dict[str, Dict[str, float]]]:
    """Each module's update as LoRA factors (B, A) with B·A = the update (fp32).

    Args:
        updates: from :func:`collect_run_factors`: ``(U, V)`` or ``{"dense": L}`` per module.
        max_rank: None keeps every factor (exact: rank = ledger rank; a dense L by its full SVD);
            N keeps the top-N singular directions of each module.

    Returns:
        ``(factors, report)``: report[name] = ``{"rank", "kept_fraction"}`` with kept fraction
        1 − ‖L − B·A‖_F / ‖L‖_F (1.0 when nothing was cut). Factors from an SVD are balanced (√Σ
        on each side) so neither is tiny in a low-precision dtype.
    """
    factors: Dict[str, Factors] = {}
    report: Dict[str, Dict[str, float]] = {}
    for name, update in updates.items():
        if isinstance(update, dict):
            u, s, vh = torch.linalg.svd(update["dense"].double(), full_matrices=False)
        elif max_rank is None or max_rank >= update[0].shape[1]:
            b, a = update  # exact: the ledger's own factors, untouched
            factors[name] = (b.float().contiguous(), a.float().contiguous())
            report[name] = {"rank": b.shape[1], "kept_fraction": 1.0}
            continue
        else:
            u, s, vh = _svd_of_product(*update)
        k = len(s) if max_rank is None else min(max_rank, len(s))
        total = s.square().sum()
        lost = s[k:].square().sum()
        root = s[:k].sqrt()
        factors[name] = ((u[:, :k] * root).float().contiguous(), (root[:, None] * vh[:k]).float().contiguous())
        kept = 1.0 if total == 0 else 1.0 - (lost / total).sqrt().item()
        report[name] = {"rank": k, "kept_fraction": kept}
    return factors, report


def _hf_module_name(key: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` → ``model.layers.0.self_attn.q_proj``."""
    return key[len("base_model.model.") :].rsplit(".lora_", 1)[0]


def peft_adapter(
    factors: Mapping[str, Factors],
    hf_config: Mapping[str, Any],
    base_model_name_or_path: str,
    dtype: torch.dtype,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """PEFT's ``adapter_model.safetensors`` tensors and ``adapter_config.json`` for LoRA factors
    in torchtune module names.

    Keys and the q/k row permutation of HF checkpoints come from torchtune's own
    ``tune_to_peft_adapter_weights`` (the checkpointer's conversion). The most common rank is
    ``r``; other modules go into ``rank_pattern``; ``lora_alpha`` (and ``alpha_pattern``) equal
    the rank, so PEFT's scale α/r is 1. ``target_modules`` are HF names (``q_proj``, …) when every
    module of those names has a factor, else the exact module paths.
    """
    tune_sd: Dict[str, torch.Tensor] = {}
    for name, (b, a) in factors.items():
        name = clean_name(name)
        tune_sd[f"{name}.lora_a.weight"] = a.to(dtype)
        tune_sd[f"{name}.lora_b.weight"] = b.to(dtype)
    head_dim = hf_config.get("head_dim")
    tensors = convert_weights.tune_to_peft_adapter_weights(
        tune_sd,
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config["num_key_value_heads"],
        dim=hf_config["hidden_size"],
        head_dim=head_dim,
    )
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    ranks = {_hf_module_name(k): v.shape[0] for k, v in tensors.items() if ".lora_A." in k}
    if not ranks:
        raise ValueError("no module has an update: nothing to export as an adapter")
    counts: Dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(sorted(counts), key=lambda k: counts[k])
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    short = sorted({m.rsplit(".", 1)[1] for m in ranks})
    layers = hf_config.get("num_hidden_layers")
    every_layer = layers is not None and len(ranks) == layers * len(short)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": short if every_layer else sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return tensors, config


# --- writing (rank 0) --------------------------------------------------------------------


def write_adapter_dir(
    epoch_dir: Path,
    updates: Mapping[str, Any],
    checkpointer,
    dtype: torch.dtype,
    export: ExportConfig = ExportConfig(),
    extra_config: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Write ``epoch_dir/adapter/`` (PEFT files + ``xgb_adapter.json``); return summary entries.

    Args:
        epoch_dir: the export directory the checkpointer just wrote (the staged ``epoch_N``).
        updates: :func:`collect_run_factors` of the run.
        checkpointer: torchtune's ``FullModelHFCheckpointer`` (its HF ``config.json`` gives the
            head layout; its ``checkpoint_dir`` is the base the adapter applies to). Any other
            checkpointer: no adapter (PEFT loads HF models only), and ``{}`` is returned.
        dtype: dtype of the written factors (the checkpoint dtype).
        export: the ``export:`` block.
        extra_config: recorded in ``xgb_adapter.json`` (e.g. which NF4 merge base).

    Returns:
        ``{"adapter_bytes", "adapter_min_kept_fraction", "adapter_max_rank"}`` for the run summary.
    """
    hf_config = getattr(checkpointer, "_config", None)
    if not isinstance(hf_config, dict) or "num_attention_heads" not in hf_config or not updates:
        return {}
    factors, report = lora_factors(updates, export.adapter_rank)
    base = str(Path(checkpointer._checkpoint_dir).expanduser().resolve())
    tensors, config = peft_adapter(factors, hf_config, base, dtype)
    # no temp-and-rename here: this runs inside the staged export, whose epoch_N/ directory only
    # appears, renamed whole, once complete (staged_export.py)
    target = Path(epoch_dir) / ADAPTER_DIR
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    save_file(tensors, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (target / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    kept = min(v["kept_fraction"] for v in report.values())
    details = {
        "adapter_rank": export.adapter_rank,
        "min_kept_fraction": kept,
        "modules": {clean_name(k): v for k, v in report.items()},
        **(extra_config or {}),
    }
    (target / ADAPTER_REPORT).write_text(json.dumps(details, indent=2))
    return {
        "adapter_bytes": (target / ADAPTER_WEIGHTS).stat().st_size,
        "adapter_min_kept_fraction": kept,
        "adapter_max_rank": max(v["rank"] for v in report.values()),
    }
