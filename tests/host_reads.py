"""Count the reads of device values back to the host, in code run on the CPU.

On a GPU every value the host reads back stalls it until the device has caught up (a
synchronisation). On the CPU none of them costs anything and host and "device" tensors are the
same kind, so :class:`HostReads` tells them apart by where a value comes from, as a GPU run
would place it:

- **device values**: the parameters and buffers of the modules given; a tensor moved with
  ``.to(d)`` or made by a factory with ``device=d`` where ``d`` is a ``torch.device`` (as the
  recipes hold theirs: torchtune's ``batch_to_device(batch, self._device)``,
  ``torch.tensor(x, device=self._device)``); and every output of an operation (aten, as
  dispatched, autograd's backward included) that has a device value among its inputs;
- **host values**: everything else, e.g. the sampler's permutation, a seeded CPU draw, the step
  counters of a non-fused torch optimizer (made on the CPU and incremented with
  ``torch.tensor(1.0, device="cpu")``: code that means the host names it with the string
  ``"cpu"``, so torch's Adam reads them for its bias correction without a synchronisation).

A **read** is, on a device value: ``aten._local_scalar_dense`` (``.item()``, ``float()``,
``int()``, ``bool()``, formatting a tensor); an operation whose output size depends on the values
(``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``…, where the host waits for the
size); ``.tolist()``, ``.numpy()`` or ``.cpu()`` (one device→host copy each on a GPU; on the CPU
they dispatch nothing, so they are counted where Python calls them, and what they do inside is
not counted again). On a GPU these are exactly the calls ``torch.cuda.set_sync_debug_mode``
reports, less the copies the host makes of its own data.

Not seen: a value that reaches the device without ``.to``/``device=`` (e.g. written into a
device buffer by a collective with host-made input), and ``.to("cpu")`` (on the CPU it cannot be
told from a move to the device).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# aten ops whose output size the host can only learn from the values
VALUE_SHAPED = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"}
# ... and so are these when indexed by a boolean mask (the kernel turns the mask into positions)
MASK_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}
PYTHON_READS = {"tolist", "numpy", "cpu"}


def _has_mask(args) -> bool:
    return any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2]))


def _tensors(tree: Any) -> List[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _caller() -> str:
    """file:line of the innermost frame outside torch and this file: where the read was asked for."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and name != __file__:
            return f"{Path(name).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class HostReads:
    """``with HostReads(model) as reads: …``, then ``reads.count`` and ``reads.where`` (one
    "op at file:line" per read). ``modules``: whose parameters and buffers are on the device."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.count = 0
        self.where: List[str] = []
        self._on_device = WeakIdKeyDictionary()
        self._quiet = 0
        for module in modules:
            self.mark(list(module.parameters()) + list(module.buffers()))
        self._modes = (_FunctionLevel(self), _DispatchLevel(self))

    def mark(self, tensors) -> None:
        for t in _tensors(tensors):
            self._on_device[t] = True

    def on_device(self, tree: Any) -> bool:
        return any(t in self._on_device for t in _tensors(tree))

    def record(self, what: str) -> None:
        if not self._quiet:
            self.count += 1
            self.where.append(f"{what} at {_caller()}")

    def __enter__(self) -> "HostReads":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _names_a_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call or a factory names a ``torch.device`` (a string "cpu" is the host)."""
    return isinstance(kwargs.get("device"), torch.device) or any(isinstance(a, torch.device) for a in args[1:])


class _FunctionLevel(TorchFunctionMode):
    """Python-level calls: reads that dispatch nothing on the CPU, and where values enter the device."""

    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in PYTHON_READS and self.reads.on_device(args[:1]):
            self.reads.record(name)
            self.reads._quiet += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.reads._quiet -= 1
        out = func(*args, **kwargs)
        moved = name in ("to", "cuda") and (name == "cuda" or _names_a_device(args, kwargs) or self.reads.on_device(args[1:]))
        made_on_device = isinstance(kwargs.get("device"), torch.device) and not _tensors(args)
        if moved or made_on_device:
            self.reads.mark(out)
        return out


class _DispatchLevel(TorchDispatchMode):
    """aten ops: device values propagate to outputs; scalar reads and value-shaped ops of them count."""

    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.reads.on_device((args, kwargs)):
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense" or name in VALUE_SHAPED or (name in MASK_INDEXED and _has_mask(args)):
                self.reads.record(name)
            self.reads.mark(out)
        return out
