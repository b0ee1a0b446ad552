"""FSDP2's all-gather of an NF4 row shard as ONE byte buffer, so one process works as well as N.

torchao's NF4Tensor hands FSDP2 three all-gather inputs (int8 scalers, the quantization factors,
the uint8 codes). Since pytorch/pytorch#160135 (torch ≥ 2.9), FSDP2 skips the all-gather when the
group has one rank and unshards from ``all_gather_inputs[0]`` alone, so ``fsdp_post_all_gather``
receives one tensor of three and ``tune run --nproc_per_node 1`` with an NF4 base failed at the
first forward ("not enough values to unpack (expected 3, got 1)"; found by the GPU check, and on
the CPU with gloo). :class:`PackedNF4Tensor` packs its three fields into one uint8 buffer
(scalers | factors | codes) and unpacks the gathered ``(world, bytes)`` rows in
``fsdp_post_all_gather``; the values FSDP rebuilds are torchao's own, bit for bit, for every
number of ranks. Cost: one copy of the gathered NF4 bytes (½ byte per weight) per unshard.

The class survives what FSDP2 and DTensor do to a local shard (``view_as``, ``detach``, ``to``, …):
torchao's ops build plain NF4Tensors, which are re-labelled as this class.
"""

from typing import Any, Optional, Tuple

import torch
from torchao.dtypes.nf4tensor import NF4Tensor, SubclassTensorArgs


def _keep_class(cls, result):
    if type(result) is NF4Tensor:
        result.__class__ = cls  # same layout, no new slots: only the FSDP hooks differ
    elif isinstance(result, (tuple, list)):
        for item in result:
            _keep_class(cls, item)
    return result


class PackedNF4Tensor(NF4Tensor):
    """An NF4 row shard whose FSDP2 all-gather input is one uint8 buffer (see module docstring)."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        return _keep_class(cls, super().__torch_dispatch__(func, types, args, kwargs))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _keep_class(cls, super().__torch_function__(func, types, args, kwargs))

    def fsdp_pre_all_gather(self, mesh) -> Tuple[Tuple[torch.Tensor, ...], Any]:
        fields, metadata = super().fsdp_pre_all_gather(mesh)
        layout = tuple((tuple(t.shape), t.dtype) for t in fields)
        packed = torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in fields])
        return (packed,), (metadata, layout)

    def fsdp_post_all_gather(
        self, all_gather_outputs: Tuple[torch.Tensor, ...], metadata: Any, param_dtype: torch.dtype,
        *, out: Optional[torch.Tensor] = None,
    ):
        (packed,), (inner, layout) = all_gather_outputs, metadata
        world = inner[-1]  # torchao's metadata ends with the process group's size
        rows = packed.view(world, -1)  # rank r's buffer is row r
        if out is not None:  # FSDP re-allocated the storage of the fields returned last time
            fields = (out.quantized_scalers, out.quantization_factor, out.quantized_data)
        else:
            fields = tuple(torch.empty((world * shape[0], *shape[1:]), dtype=dtype, device=packed.device)
                           for shape, dtype in layout)
        start = 0
        for field, (shape, dtype) in zip(fields, layout):
            width = torch.Size(shape).numel() * dtype.itemsize
            field.view(-1).view(torch.uint8).view(world, width).copy_(rows[:, start : start + width])
            start += width
        if out is not None:
            return None
        unsharded, _ = super().fsdp_post_all_gather(fields, inner, param_dtype)
        return unsharded, fields


def packed_nf4(tensor: NF4Tensor) -> PackedNF4Tensor:
    """``tensor``'s fields (shared, not copied) as a :class:`PackedNF4Tensor`."""
    meta = SubclassTensorArgs(tensor.shape, tensor.stride(), tensor.storage_offset(), tensor.dtype, tensor.device,
                              tensor.requires_grad)
    return PackedNF4Tensor(meta, tensor.block_size, tensor.n_blocks, tensor.scaler_block_size, tensor.quantized_scalers,
                           tensor.quantization_factor, tensor.scaler_mean, tensor.quantized_data, tensor.nf4)
