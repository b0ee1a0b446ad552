"""Export: fold the exact merged state into plain weights, once, as a pure state-dict transform.

Training keeps S = W0 + L per adapted module (see merged_state.py). Export adds whatever the
live adapters still hold (a partial round), sums in fp32, and casts to the checkpoint dtype
once. The result has the plain model's keys only, so torchtune's ``generate`` (or any HF tool,
after the checkpointer's conversion) loads it into the non-LoRA model class.
"""

from typing import Dict, Iterable, Mapping, Tuple, Union

import torch

# adapter tensors of LoRA (torchtune names) and LoRA-XS (ours): none belong in a plain model
ADAPTER_KEY_MARKERS = ("lora_a", "lora_b", "lora_magnitude", "magnitude", ".xs_a", ".xs_b", ".xs_core")


def clean_name(name: str) -> str:
    """A module or parameter name as state dicts spell it: without the wrapper that activation
    checkpointing inserts (``layers.0._checkpoint_wrapped_module.attn`` → ``layers.0.attn``)."""
    return name.replace("._checkpoint_wrapped_module", "").replace("_checkpoint_wrapped_module.", "")


def fold_merged_weights(
    model_state_dict: Mapping[str, torch.Tensor],
    merged_weights: Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]],
    dtype: torch.dtype,
) -> Dict[str, torch.Tensor]:
    """Return a plain state dict (CPU tensors, adapter keys removed).

    Args:
        model_state_dict: the training model's state dict (with ``lora_*`` keys).
        merged_weights: module name → merged weight (out×in), e.g. W0 + L + B·A: a mapping, or
            (name, weight) pairs from an iterator, consumed one at a time so a streamed export
            (``Booster.export_weights``) never holds more than one full-precision module.
        dtype: dtype of the written weights (the checkpoint dtype).

    Weights already on the CPU in ``dtype`` are used as they are (no copy); the result must be
    treated as read-only.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in model_state_dict.items():
        if any(marker in key for marker in ADAPTER_KEY_MARKERS):
            continue
        out[key] = value.detach().cpu()
    pairs = merged_weights.items() if isinstance(merged_weights, Mapping) else merged_weights
    for module_name, weight in pairs:
        key = f"{clean_name(module_name)}.weight"
        if key not in out:
            raise KeyError(f"merged weight for {module_name} has no '{key}' in the model state dict")
        out[key] = weight.detach().to(device="cpu", dtype=dtype)
    return out
