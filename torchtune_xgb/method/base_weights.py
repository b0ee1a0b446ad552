"""Where the copy of W0 lives and how it travels back to the weights' device for a merge."""

import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from torchtune_xgb.distributed.sharding import local


def base_copy(weight: torch.Tensor, base_device: str) -> torch.Tensor:
    """A copy of W0 on ``base_device``. A CPU copy of a GPU weight goes to pinned (page-locked)
    memory, so re-deriving the weight after a merge copies it back asynchronously at full PCIe
    speed (pageable memory is staged through a bounce buffer, at a fraction of it); if pinning
    fails (a locked-memory limit), the copy stays pageable, with a warning."""
    target = torch.device(base_device)
    if target.type != "cpu" or weight.device.type != "cuda":
        return weight.to(device=target, copy=True)
    try:
        copy = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    except RuntimeError as err:  # pragma: no cover - depends on the host's limits
        warnings.warn(f"boost.base_device: cannot pin {weight.numel() * weight.element_size()} bytes ({err}); W0 stays pageable")
        return weight.to(device=target, copy=True)
    return copy.copy_(weight)


class W0Prefetch:
    """Copies W0 of the next module to the GPU on a side stream while this one is re-derived.

    A merge with W0 in pinned CPU memory is bound by PCIe (2 bytes per parameter against ~20
    bytes of HBM traffic at ~100× the bandwidth), so the copy engine should never wait for the
    compute: module i+1's W0 is in flight while module i's GEMM runs. A no-op (``take`` returns
    None) unless W0 is pinned on the CPU and the weights are on a GPU.
    """

    def __init__(self, bases: Dict[str, torch.Tensor], names: List[str], modules: Dict[str, nn.Module]):
        self.bases, self.pending = bases, {}
        self.names = [n for n in names if bases[n].is_pinned() and local(modules[n].weight).is_cuda]
        if not self.names:
            return
        self.device = local(modules[self.names[0]].weight).device
        self.stream = torch.cuda.Stream(self.device)
        self.order = iter(self.names)
        self._issue()

    def _issue(self) -> None:
        name = next(self.order, None)
        if name is None:
            return
        with torch.cuda.stream(self.stream):
            copy = self.bases[name].to(self.device, non_blocking=True)
            self.pending[name] = (copy, self.stream.record_event())

    def take(self, name: str) -> Optional[torch.Tensor]:
        if name not in self.pending:
            return None
        self._issue()  # the next module's W0 travels while this one is used
        copy, ready = self.pending.pop(name)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        copy.record_stream(current)  # allocated on the side stream, freed after use on this one
        return copy
