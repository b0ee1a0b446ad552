"""Host copies the merged state keeps beside the weights, and how they travel for a merge."""

import warnings
from typing import Dict, List, Optional

import torch


def host_empty(shape, dtype: torch.dtype, base_device: str, pin: bool) -> torch.Tensor:
    """An uninitialised tensor on ``base_device``; ``pin``: in pinned (page-locked) CPU memory, so a
    merge copies it to the GPU and back asynchronously at full PCIe speed (pageable memory is
    staged through a bounce buffer, at a fraction of it). If pinning fails (a locked-memory
    limit), it stays pageable, with a warning (Python shows it once)."""
    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # pragma: no cover - depends on the host's limits
            warnings.warn("boost.base_device: cannot pin the merged state's host memory (a locked-memory limit?); "
                          "it stays pageable, and merges copy it synchronously")
    return torch.empty(shape, dtype=dtype, device=base_device)


class Prefetch:
    """Copies the host tensor of the next module to the GPU on a side stream while this one is used.

    A merge with its state in pinned CPU memory is bound by PCIe (a bf16 module's remainder codes:
    2 bytes per parameter each way, against tens of bytes of HBM traffic at ~100× the bandwidth), so the copy engine should never wait for
    the compute: module i+1's tensor is in flight while module i's update runs. A no-op (``take``
    returns None) unless the tensors are pinned on the CPU and ``device`` is a GPU.
    """

    def __init__(self, tensors: Dict[str, torch.Tensor], names: List[str], device: torch.device):
        self.tensors, self.pending = tensors, {}
        self.names = [n for n in names if device.type == "cuda" and tensors[n].is_pinned()]
        if not self.names:
            return
        self.device = device
        self.stream = torch.cuda.Stream(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after earlier writes to them
        self.order = iter(self.names)
        self._issue()

    def _issue(self) -> None:
        name = next(self.order, None)
        if name is None:
            return
        with torch.cuda.stream(self.stream):
            copy = self.tensors[name].to(self.device, non_blocking=True)
            self.pending[name] = (copy, self.stream.record_event())

    def take(self, name: str) -> Optional[torch.Tensor]:
        if name not in self.pending:
            return None
        self._issue()  # the next module's tensor travels while this one is used
        copy, ready = self.pending.pop(name)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        copy.record_stream(current)  # allocated on the side stream, freed after use on this one
        return copy
