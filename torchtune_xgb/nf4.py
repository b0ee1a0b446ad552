"""NF4 (torchao) base weights for shapes torchao's defaults cannot take.

torchao's NF4 double quantization needs ``numel`` divisible by ``block_size`` (64) and the
number of blocks divisible by ``scaler_block_size`` (256), i.e. in·out divisible by 16384.
SmolLM2's attention projections (576×576, 192×576) are not. torchtune's ``LoRALinear`` and
``FrozenNF4Linear`` call ``to_nf4`` with the defaults from inside the stock builders, so while
the model is built we route those calls through :func:`to_nf4_fitting`, which keeps block size
64 and picks the largest scaler block ≤ 256 that divides the number of blocks (the scaler
statistics get slightly finer; the 4-bit codes are the same). A weight whose size is not even a
multiple of 64 stays in full precision, and :func:`keep_unquantizable_in_full_precision` makes
that module a plain linear with one warning naming it.

Loading the checkpoint afterwards re-quantizes through NF4Tensor's ``copy_``, which reuses each
tensor's own block sizes, so the choice made here holds for the real weights.
"""

import contextlib
from typing import Iterator, List

import torch
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor
from torchao.dtypes.nf4tensor import to_nf4 as _ao_to_nf4
from torchtune import utils

log = utils.get_logger("INFO")

BLOCK_SIZE = 64
MAX_SCALER_BLOCK = 256


def fitting_scaler_block(numel: int, block_size: int = BLOCK_SIZE, max_scaler_block: int = MAX_SCALER_BLOCK) -> int:
    """Largest scaler block ≤ ``max_scaler_block`` dividing numel/block_size; 0 if numel % block_size."""
    if numel % block_size:
        return 0
    blocks = numel // block_size
    return next(s for s in range(min(max_scaler_block, blocks), 0, -1) if blocks % s == 0)


def to_nf4_fitting(tensor: torch.Tensor, block_size: int = BLOCK_SIZE, scaler_block_size: int = MAX_SCALER_BLOCK):
    """``to_nf4`` that adapts the scaler block to the shape; returns ``tensor`` unchanged if even
    ``block_size`` does not divide it (the caller then keeps that module in full precision)."""
    scaler = fitting_scaler_block(tensor.numel(), block_size, scaler_block_size)
    if scaler == 0:
        return tensor
    return _ao_to_nf4(tensor, block_size, scaler)


@contextlib.contextmanager
def fitting_nf4_blocks() -> Iterator[None]:
    """While active, torchtune's NF4 modules quantize with :func:`to_nf4_fitting`."""
    import torchtune.modules.low_precision.nf4_linear as nf4_linear
    import torchtune.modules.peft.lora as lora

    saved = (lora.to_nf4, nf4_linear.to_nf4)
    lora.to_nf4 = nf4_linear.to_nf4 = to_nf4_fitting
    try:
        yield
    finally:
        lora.to_nf4, nf4_linear.to_nf4 = saved


def keep_unquantizable_in_full_precision(model: nn.Module) -> List[str]:
    """Modules built for NF4 whose weight could not be quantized become full-precision linears.

    Returns their names; logs one warning naming them.
    """
    from torchtune.modules.low_precision import FrozenNF4Linear
    from torchtune.modules.peft import LoRALinear

    kept = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or isinstance(weight, NF4Tensor):
            continue
        if isinstance(module, LoRALinear) and module._quantize_base:
            module._quantize_base = False
            kept.append(name)
        elif isinstance(module, FrozenNF4Linear):
            module.__class__ = nn.Linear
            kept.append(name)
    if kept:
        log.warning(
            f"NF4: {len(kept)} module(s) have a size that is not a multiple of {BLOCK_SIZE} and stay in "
            f"full precision: {', '.join(kept)}"
        )
    return kept


def is_nf4(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, NF4Tensor)


def dequantize(tensor: torch.Tensor) -> torch.Tensor:
    """The weights an NF4 tensor represents (what training saw), in its original dtype."""
    return tensor.get_original_weight() if isinstance(tensor, NF4Tensor) else tensor
