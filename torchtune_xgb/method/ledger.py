"""The exact record of one module's merged rounds: factors U·V, or a dense matrix once that is smaller.

See :mod:`torchtune_xgb.method.merged_state` for where ledgers sit in the merged state.
"""

from typing import Dict, Optional

import torch
from torch import nn


class Ledger:
    """Exact record L of one module's merged updates: factors U (out×k), V (k×in), or dense.

    Factors are stored in the narrowest dtype that holds them *exactly* (``add``'s ``dtype``):
    bf16 when the round's factors are bf16 adapter values scaled by a power of two (then the
    stored factors equal the fp32 ones bit for bit, at half the memory), else fp32. A ledger only
    ever widens (bf16 → fp32, exact). Products and sums of the factors are always formed in fp32
    (``float()``), never in the storage dtype; the kept fraction of every merge measures the stored
    factors, so a storage that lost anything would show there.
    """

    def __init__(self, out_dim: int, in_dim: int, device: torch.device, full_out: Optional[int] = None):
        self.u = torch.zeros(out_dim, 0, device=device)
        self.v = torch.zeros(0, in_dim, device=device)
        self.dense: Optional[torch.Tensor] = None
        self.full_out = out_dim if full_out is None else full_out  # all ranks' rows (FSDP2)

    @property
    def rank_bound(self) -> int:
        return self.u.shape[1] if self.dense is None else min(self.full_out, self.dense.shape[1])

    def matrix(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.u.float() @ self.v.float()

    def add(self, u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        """Append u·v (fp32 factors); ``dtype``: what they are stored in, one that holds them exactly."""
        if self.dense is not None:
            self.dense.addmm_(u.float(), v.float())
            return
        if self.u.shape[1] == 0:  # an empty ledger takes the round's factors in its storage dtype
            # (copies: v may be the adapter's own A, which the re-initialisation overwrites)
            self.u, self.v = u.to(dtype, copy=True), v.to(dtype, copy=True)
        else:
            if dtype != self.u.dtype:  # mixed rounds: widen to fp32 (exact), never narrow
                self.u, self.v = self.u.float(), self.v.float()
            self.u = torch.cat([self.u, u.to(self.u.dtype)], dim=1)
            self.v = torch.cat([self.v, v.to(self.v.dtype)], dim=0)
        out_dim, in_dim = self.full_out, self.v.shape[1]  # the same decision on every rank
        # dense once the factors hold as many bytes as a dense fp32 matrix would: bf16 factors
        # stay factored twice as many rounds as fp32 ones (switching earlier would double memory)
        if self.u.element_size() * self.u.shape[1] * (out_dim + in_dim) >= 4 * out_dim * in_dim:
            self.dense = self.u.float() @ self.v.float()
            self.u = self.u[:, :0]
            self.v = self.v[:0]

    def state(self) -> Dict[str, torch.Tensor]:
        if self.dense is not None:
            return {"dense": self.dense.cpu()}
        return {"u": self.u.cpu(), "v": self.v.cpu()}

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        device = self.u.device
        if "dense" in state:
            self.dense = state["dense"].to(device=device, dtype=torch.float32)
        else:  # as saved: bf16 factors stay bf16 (exact), anything else becomes fp32
            dtype = torch.bfloat16 if state["u"].dtype == state["v"].dtype == torch.bfloat16 else torch.float32
            self.u = state["u"].to(device=device, dtype=dtype)
            self.v = state["v"].to(device=device, dtype=dtype)
            self.dense = None


def storage_dtype(module: nn.Module, merge_rate: float) -> torch.dtype:
    """The dtype a module's merged factors are stored in: ``module.factor_dtype(merge_rate)`` where
    the adapter defines it (a dtype that holds ``merge_factors(merge_rate)`` exactly), else fp32."""
    exact = getattr(module, "factor_dtype", None)
    return exact(merge_rate) if exact is not None else torch.float32
