"""NF4 base weights under FSDP2: every shard is a row slice of one single-device quantization.

torchao's NF4 tensor cannot simply be chunked and loaded under FSDP2 (design.md §3): a chunk
keeps its parent's block count (so ``copy_`` into it recurses forever), FSDP's chunking asserts
that every rank gets whole scaler blocks, and FSDP's all-gather rebuilds the full weight with the
*local* ``scaler_mean`` and scaler block size. So, with the rows split evenly over the ranks:

1. before ``fully_shard`` (:func:`prepare_nf4_for_row_sharding`), each meta NF4 weight is given
   the scaler block its shards can hold (nf4.shard_scaler_block; unchanged where the
   single-device one already fits), or a one-line error names the module that cannot be split;
2. at load (:func:`nf4_dtensor_shard`), every rank quantizes the whole checkpoint tensor exactly
   as one device does and keeps its rows (nf4.nf4_row_shard): the same codes, scalers and scaler
   mean on every rank, so the all-gathered weight is bit for bit the single-device one. The shard
   is a :class:`~torchtune_xgb.quant.nf4_all_gather.PackedNF4Tensor` (one all-gather buffer, which
   FSDP2's one-rank path needs).
"""

from typing import List

import torch
from torch import nn

from torchtune_xgb.distributed.sharding import DTensor, local, row_mesh
from torchtune_xgb.export.fold import clean_name
from torchtune_xgb.quant.nf4 import fitting_scaler_block, is_nf4, nf4_from_fields, nf4_row_shard, quantize_full, shard_scaler_block
from torchtune_xgb.quant.nf4_all_gather import packed_nf4


def prepare_nf4_for_row_sharding(model: nn.Module, world: int) -> List[str]:
    """Give each (meta) NF4 weight of ``model`` a scaler block that ``world`` row shards hold whole.

    Call before ``fully_shard``. Returns the names of the modules whose scaler block changed
    (their values at load are still those of the single-device quantization). Raises ConfigError
    naming the first module whose weight cannot be split into whole NF4 blocks.
    """
    changed = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or not is_nf4(weight):
            continue
        rows, cols = weight.shape
        sub = shard_scaler_block(clean_name(name), (rows, cols), weight.block_size, weight.scaler_block_size, world)
        if sub == weight.scaler_block_size:
            continue
        n_blocks = rows * cols // weight.block_size
        empty = lambda n, dtype: torch.empty(n, dtype=dtype, device=weight.device)  # noqa: E731
        module.weight = nn.Parameter(
            nf4_from_fields(
                (rows, cols), weight.dtype, weight.block_size, sub,
                empty(n_blocks, torch.int8), empty(n_blocks // sub, weight.dtype), empty((), weight.dtype),
                empty(rows * cols // 2, torch.uint8), empty(16, weight.dtype),
            ),
            requires_grad=False,
        )
        changed.append(clean_name(name))
    return changed


def nf4_dtensor_shard(sharded: DTensor, tensor: torch.Tensor, device: torch.device) -> DTensor:
    """This rank's shard of the NF4 weight loaded from the full checkpoint ``tensor``, as a DTensor
    laid out like ``sharded`` (the model's current, e.g. meta, sharded NF4 parameter)."""
    if tuple(tensor.shape) != tuple(sharded.shape):
        raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} for an NF4 weight of {tuple(sharded.shape)}")
    mesh = row_mesh(sharded)
    layout = local(sharded)
    full = quantize_full(
        tensor, layout.block_size, fitting_scaler_block(tensor.numel(), layout.block_size), layout.dtype, device
    )
    shard = packed_nf4(nf4_row_shard(full, mesh.get_local_rank(0), mesh.size(0), layout.scaler_block_size))
    return DTensor.from_local(shard, mesh, sharded.placements, run_check=False, shape=sharded.shape, stride=sharded.stride())
