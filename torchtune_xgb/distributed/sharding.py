"""Shard-local views for FSDP2: the small helpers the merge code uses on DTensors.

Under FSDP2 every parameter of a sharded module is a ``DTensor`` sharded along dim 0 over a 1-D
mesh (torch.chunk rows: uneven sizes, possibly empty on the last ranks). An adapted module's
weight W (out×in) and its ``lora_b`` (out×r) are sharded alike, so rows of W and rows of B live
on the same rank and the merge ``W_local += u_local · v`` with ``u_local = η(α/r)·B_local`` and
``v = A`` (r×in, small: gathered) is exact without ever gathering W.

On one process (plain tensors, no process group) every helper is the identity, so single-device
numerics are bit-for-bit what they were.
"""

from typing import List, Optional

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import DTensor, Shard


def is_sharded(t) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``t`` itself if it is a plain tensor). Writes go to the shard."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` on every rank (collective for a DTensor; only for small tensors)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def row_mesh(like: DTensor):
    """The 1-D mesh of a row-sharded (Shard(0)) DTensor; NotImplementedError for other layouts."""
    placements = like.placements
    if like.device_mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(f"only 1-D FSDP (rows sharded, Shard(0)) is supported, got {placements}")
    return like.device_mesh


def row_chunks(rows: int, like: DTensor) -> List[range]:
    """Row ranges of each rank for a dim-0 sharding like ``like``'s (torch.chunk, empties padded)."""
    mesh = row_mesh(like)
    world = mesh.size(0)
    ranges, start = [], 0
    for chunk in torch.arange(rows).chunk(world):
        ranges.append(range(start, start + len(chunk)))
        start += len(chunk)
    while len(ranges) < world:
        ranges.append(range(rows, rows))
    return ranges


def local_rows(full_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of ``full_tensor`` that this rank holds when sharded like ``like`` (identity if plain)."""
    if not isinstance(like, DTensor):
        return full_tensor
    mesh = row_mesh(like)
    span = row_chunks(full_tensor.shape[0], like)[mesh.get_local_rank(0)]
    return full_tensor[span.start : span.stop]


def gather_rows(local_tensor: torch.Tensor, like: torch.Tensor, rows: int) -> torch.Tensor:
    """Stack every rank's rows of a row-sharded tensor (plain ``local_tensor`` if ``like`` is plain)."""
    return full(rows_like(local_tensor, like, rows))


def rows_like(local_tensor: torch.Tensor, like: torch.Tensor, rows: int) -> torch.Tensor:
    """This rank's rows of a ``rows``-row tensor as a DTensor sharded like ``like`` (no
    communication); ``local_tensor`` itself if ``like`` is plain. Undo with :func:`full`."""
    if not isinstance(like, DTensor):
        return local_tensor
    mesh = row_mesh(like)
    shape = (rows, *local_tensor.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_tensor.contiguous(), mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


class _LinearGatheredRows(torch.autograd.Function):
    """y = x·Wᵀ for a frozen W whose rows are sharded: W is gathered in the forward and gathered
    again in the backward, so the whole W is never kept alive between them (as FSDP reshards)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: DTensor) -> torch.Tensor:
        ctx.rows = rows  # this rank's rows only (a DTensor of the frozen state, not an activation)
        return torch.nn.functional.linear(x, rows.full_tensor().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.rows.full_tensor().to(grad.dtype), None


class _LinearCastWeight(torch.autograd.Function):
    """y = x·Wᵀ for a frozen W stored in another dtype than x: W is cast in the forward and cast
    again in the backward, so the cast copy is never kept alive between them (autograd would save
    it for the backward: a second, wider copy of every merged state for the whole step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the stored frozen state itself (an input: no copy)
        return torch.nn.functional.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None


def linear_frozen(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a frozen (no-grad) weight, computed in ``x``'s dtype (merged
    states may be stored in bf16 or fp32), that may be row-sharded (a DTensor from
    :func:`rows_like`). Sharded: a collective in the forward and in the backward, so every rank must
    run the same modules in the same order (as FSDP2 itself requires)."""
    if isinstance(weight, DTensor):
        return _LinearGatheredRows.apply(x, weight)
    if weight.dtype == x.dtype:
        return torch.nn.functional.linear(x, weight)
    return _LinearCastWeight.apply(x, weight)


def all_sum(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a per-rank tensor over the ranks that shard ``like`` (as is if ``like`` is plain)."""
    if not isinstance(like, DTensor):
        return value
    value = value.clone()
    dist.all_reduce(value, group=row_mesh(like).get_group(0))
    return value


def any_nonzero(local_tensor: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether any rank's shard of ``like`` has a non-zero entry (the same answer on every rank)."""
    flag = torch.any(local_tensor).to(torch.int32).reshape(1)
    if isinstance(like, DTensor):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=row_mesh(like).get_group(0))
    return bool(flag.item())


def broadcast_from_rank0(compute, shapes, device, like: DTensor) -> tuple:
    """``compute()`` (a tuple of fp32 tensors of ``shapes``) on rank 0 of ``like``'s mesh, broadcast."""
    mesh = row_mesh(like)
    group = mesh.get_group(0)
    if mesh.get_local_rank(0) == 0:
        tensors = [t.float().contiguous().to(device) for t in compute()]
    else:
        tensors = [torch.empty(shape, dtype=torch.float32, device=device) for shape in shapes]
    src = dist.get_global_rank(group, 0)
    for t in tensors:
        dist.broadcast(t, src=src, group=group)
    return tuple(tensors)


def world_rank() -> Optional[int]:
    """This process's rank in the default group, or None without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered, on the CPU.

    The result has the single-device layout (one process could load it, and so could another
    world size). A collective: call it on every rank.
    """
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        state[idx] = {k: (full(v).cpu() if is_sharded(v) else v) for k, v in sd["state"][idx].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a state saved by :func:`gather_optimizer_state`: each rank keeps its rows of each tensor."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, entry in sd["state"].items():
        param = params[int(idx)]
        state[idx] = {}
        for key, value in entry.items():
            if is_sharded(param) and torch.is_tensor(value) and value.shape == param.shape:
                rows = local_rows(value, param).to(local(param).device)
                value = DTensor.from_local(
                    rows, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
                )
            state[idx][key] = value
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
