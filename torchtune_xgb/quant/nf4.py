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

FSDP2 (:func:`shard_scaler_block`, :func:`nf4_row_shard`): every rank quantizes the *whole*
weight exactly as one device does and keeps its rows of that one quantization. A rank's rows must
hold whole 64-value blocks; a scaler block that a shard boundary would cut is split into smaller
scaler blocks carrying the same quantization factor, so the dequantized values are unchanged and
FSDP's all-gather (which reuses the local ``scaler_mean`` and scaler block size) rebuilds exactly
the single-device weight.
"""

import contextlib
import math
from typing import Iterator, List

import torch
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor, SubclassTensorArgs
from torchao.dtypes.nf4tensor import to_nf4 as _ao_to_nf4
from torchtune import utils

from torchtune_xgb.distributed.sharding import local
from torchtune_xgb.errors import ConfigError

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

    kept = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or isinstance(local(weight), NF4Tensor):  # FSDP2: an NF4 shard in a DTensor
            continue
        if getattr(module, "_quantize_base", False):  # LoRALinear, or LoRA-XS converted before FSDP2 sharding
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
    """Whether ``tensor`` is an NF4 tensor (pass ``sharding.local(weight)`` for an FSDP2 weight)."""
    return isinstance(tensor, NF4Tensor)


def dequantize(tensor: torch.Tensor) -> torch.Tensor:
    """The weights an NF4 tensor represents (what training saw), in its original dtype; under
    FSDP2 pass this rank's shard (``sharding.local(weight)``) and get its rows."""
    return tensor.get_original_weight() if isinstance(tensor, NF4Tensor) else tensor


# --- FSDP2: row shards of one quantization -----------------------------------------------------


def shard_scaler_block(name: str, shape, block_size: int, scaler_block_size: int, world: int) -> int:
    """Scaler block of each rank's row shard of an NF4 weight of ``shape`` quantized with
    (``block_size``, ``scaler_block_size``), split over ``world`` ranks.

    Returns the largest divisor of ``scaler_block_size`` that tiles every shard (so a shard holds
    whole scaler blocks). Raises ConfigError naming module ``name`` if the rows do not split evenly
    or a shard would cut a 64-value quantization block.
    """
    rows, cols = shape
    if rows % world or (rows // world * cols) % block_size:
        raise ConfigError(
            f"model.quantize_base: {name} ({rows}×{cols}) cannot be split over {world} ranks into whole "
            f"NF4 blocks of {block_size} values (needs rows divisible by {world} and rows/{world}·{cols} "
            f"divisible by {block_size}); use another --nproc_per_node or quantize_base: False"
        )
    return math.gcd(scaler_block_size, rows // world * cols // block_size)


def quantize_full(
    tensor: torch.Tensor, block_size: int, scaler_block_size: int, dtype: torch.dtype, device: torch.device
) -> NF4Tensor:
    """The NF4 quantization one device makes when it loads ``tensor`` into an NF4 weight of
    ``dtype``: quantized from the checkpoint tensor as given (NF4Tensor's ``copy_`` quantizes its
    source before casting), then held in ``dtype``."""
    quantized = _ao_to_nf4(tensor.to(device), block_size, scaler_block_size)
    return nf4_from_fields(
        quantized.shape, dtype, block_size, scaler_block_size,
        quantized.quantized_scalers, quantized.quantization_factor.to(dtype), quantized.scaler_mean.to(dtype),
        quantized.quantized_data, quantized.nf4.to(dtype),
    )


def nf4_row_shard(full: NF4Tensor, rank: int, world: int, scaler_block_size: int) -> NF4Tensor:
    """Rank ``rank``'s rows (torch.chunk of ``world`` even chunks) of ``full`` as an NF4 tensor with
    scaler blocks of ``scaler_block_size`` (from :func:`shard_scaler_block`).

    The shard's fields are slices of ``full``'s (each quantization factor repeated for the smaller
    scaler blocks it is split into) and its ``scaler_mean`` is ``full``'s, so dequantizing the
    shards and stacking them gives exactly ``full``'s dequantized weight.
    """
    rows, cols = full.shape
    shard_rows = rows // world
    blocks = shard_rows * cols // full.block_size
    split = full.scaler_block_size // scaler_block_size  # sub-blocks per full scaler block
    factors = full.quantization_factor.repeat_interleave(split)
    per_shard = {
        "quantized_data": shard_rows * cols // 2,  # two 4-bit codes per byte
        "quantized_scalers": blocks,
        "quantization_factor": blocks // scaler_block_size,
    }
    fields = {"quantized_data": full.quantized_data, "quantized_scalers": full.quantized_scalers, "quantization_factor": factors}
    sliced = {k: fields[k][rank * n : (rank + 1) * n].clone() for k, n in per_shard.items()}  # not views of the whole
    return nf4_from_fields(
        (shard_rows, cols), full.dtype, full.block_size, scaler_block_size,
        sliced["quantized_scalers"], sliced["quantization_factor"], full.scaler_mean.clone(),
        sliced["quantized_data"], full.nf4.clone(),
    )


def nf4_from_fields(
    shape, dtype, block_size, scaler_block_size, quantized_scalers, quantization_factor, scaler_mean, quantized_data, nf4
) -> NF4Tensor:
    """An NF4Tensor of ``shape`` (2-D, contiguous, no grad, on ``quantized_data``'s device) from its
    fields, through torchao's constructor. Its block count is its own (a torchao chunk keeps its
    parent's, which is what makes ``copy_`` into a chunk recurse)."""
    shape = torch.Size(shape)
    meta = SubclassTensorArgs(shape, (shape[1], 1), 0, dtype, quantized_data.device, False)
    n_blocks = shape.numel() // block_size
    return NF4Tensor(meta, block_size, n_blocks, scaler_block_size, quantized_scalers, quantization_factor,
                     scaler_mean, quantized_data, nf4)
