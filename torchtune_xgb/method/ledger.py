"""The exact record of one module's merged rounds: factors U·V, or a dense matrix once that is smaller.

See :mod:`torchtune_xgb.method.merged_state` for where ledgers sit in the merged state.
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from torchtune_xgb.method.base_weights import host_empty

# Rounds of factors per storage chunk (at most): an append writes into the open chunk and never
# copies the earlier rounds, so a merge costs the same at round 1,000 as at round 1 (a fresh chunk
# is allocated every CHUNK_ROWS rows).
CHUNK_ROWS = 64
FIRST_CHUNK_ROWS = 8


def chunk_rows(held: int) -> int:
    """Rows of the chunk allocated once ``held`` rows fill the earlier ones: about what is held
    (from FIRST_CHUNK_ROWS up to CHUNK_ROWS), so a ledger of a few rounds allocates about what it
    holds. A function of the rows held alone, never of how they arrived: appending round by round
    and loading every round at once give the same chunks, the same bytes."""
    return min(CHUNK_ROWS, max(FIRST_CHUNK_ROWS, held))


class _Rows:
    """Append-only rows of a 2-D tensor, in chunks of ``CHUNK_ROWS`` rows that are never copied
    once written: appending costs the rows appended, whatever is stored already."""

    def __init__(self, width: int, device: torch.device, pin: bool):
        self.width, self.device, self.pin = width, device, pin
        self.chunks: List[torch.Tensor] = []
        self.filled = 0  # rows used in the last chunk
        self.before_last = 0  # rows in the chunks before the last (all full)
        self.dtype = torch.float32

    @property
    def count(self) -> int:
        return self.before_last + self.filled

    def _new_chunk(self, rows: int) -> torch.Tensor:
        return host_empty((rows, self.width), self.dtype, self.device, self.pin)

    def append(self, rows: torch.Tensor) -> torch.Tensor:
        """Copy ``rows`` (any device and dtype: converted as copied) in, asynchronously from a GPU
        into pinned chunks; return them as stored."""
        first, done = self.count, 0
        while done < rows.shape[0]:
            if not self.chunks or self.filled == self.chunks[-1].shape[0]:
                held = self.count
                self.chunks.append(self._new_chunk(chunk_rows(held)))
                self.before_last, self.filled = held, 0
            take = min(rows.shape[0] - done, self.chunks[-1].shape[0] - self.filled)
            part = rows if take == rows.shape[0] else rows[done : done + take]
            written = self.chunks[-1][self.filled : self.filled + take].copy_(part, non_blocking=True)
            self.filled += take
            done += take
        return written if done == take else self.slice(first, self.count)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (a view when they lie in one chunk, else a copy)."""
        parts, offset = [], 0
        for chunk in self.chunks:
            size = chunk.shape[0] if chunk is not self.chunks[-1] else self.filled
            lo, hi = max(start - offset, 0), min(stop - offset, size)
            if lo < hi:
                parts.append(chunk[lo:hi])
            offset += chunk.shape[0]
        if not parts:
            return torch.zeros(0, self.width, dtype=self.dtype, device=self.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def whole(self) -> torch.Tensor:
        return self.slice(0, self.count)

    def replace(self, tensor: torch.Tensor) -> None:
        """Hold exactly ``tensor``'s rows, in ``tensor``'s dtype, chunked as appends would have
        chunked them (so a resumed ledger holds the same bytes as the uninterrupted one)."""
        self.dtype = tensor.dtype
        self.chunks, self.filled, self.before_last = [], 0, 0
        if tensor.shape[0]:
            self.append(tensor)

    def widen(self) -> None:
        """Store fp32 from now on; the rows held so far are converted exactly (once)."""
        self.dtype = torch.float32
        self.chunks = [c.float() for c in self.chunks]

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)


class Ledger:
    """Exact record L of one module's merged updates: factors U (out×k), V (k×in), or dense.

    Factors are stored in the narrowest dtype that holds them *exactly* (``add``'s ``dtype``):
    bf16 when the round's factors are bf16 adapter values scaled by a power of two (then the
    stored factors equal the fp32 ones bit for bit, at half the memory), else fp32. A ledger only
    ever widens (bf16 → fp32, exact). Products and sums of the factors are always formed in fp32
    (``float()``), never in the storage dtype; the kept fraction of every merge measures the stored
    factors, so a storage that lost anything would show there.

    Two forms. Factored: every round's factors. Dense, once the factors would take as many bytes
    as a dense fp32 matrix: L as of the last segment boundary (``dense``, fp32) plus the rounds
    since then as factors (the *tail*). Both change only at :meth:`fold`, called at each segment
    boundary (merged_state.SEGMENT_ROUNDS): a factored ledger turns dense there, a dense one adds
    its tail to the matrix (one rank-k update) and drops it. A merge only ever appends, so it
    costs the same whatever the form, and what a resume checkpoint must hold of a dense ledger is
    its tail, not the matrix (method/merged_checkpoint.py).

    Storage: on ``device`` (the merged state's ``base_device``, the CPU by default: nothing of it
    grows on the accelerator), append-only (an append writes only the new round's rows, see
    ``CHUNK_ROWS``), in pinned memory when the rounds come from a GPU (``pin``), so a merge copies
    them off asynchronously. U is held transposed (rows are rounds). Earlier rounds change only by
    assigning ``u`` or ``v`` or by a fold (each counts in ``generation``; a merge that sees it change
    while appending reports an internal error), never by an append.

    ``last_added``: the (u, v) the last :meth:`add` stored, as stored (storage dtype, on the
    ledger's device): what the training views apply, so the forward pass sees exactly what the
    ledger holds.
    """

    def __init__(self, out_dim: int, in_dim: int, device: torch.device, full_out: Optional[int] = None,
                 pin: bool = False):
        self._u = _Rows(out_dim, torch.device(device), pin)  # Uᵀ: one row per factor
        self._v = _Rows(in_dim, torch.device(device), pin)
        self.dense: Optional[torch.Tensor] = None  # L as of the last fold, once dense
        self.full_out = out_dim if full_out is None else full_out  # all ranks' rows (FSDP2)
        self.generation = 0
        self.last_added: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def device(self) -> torch.device:
        return self._u.device

    @property
    def columns(self) -> int:
        """Stored factor pairs (columns of U): every round while factored, the tail once dense."""
        return self._u.count

    @property
    def u(self) -> torch.Tensor:
        """U (out×k) as stored: a copy of the chunks (O(k): for export, resume and tests)."""
        return self._u.whole().T

    @u.setter
    def u(self, value: torch.Tensor) -> None:
        self._u.replace(value.T)
        self.generation += 1

    @property
    def v(self) -> torch.Tensor:
        return self._v.whole()

    @v.setter
    def v(self, value: torch.Tensor) -> None:
        self._v.replace(value)
        self.generation += 1

    @property
    def rank_bound(self) -> int:
        return self.columns if self.dense is None else min(self.full_out, self.dense.shape[1])

    def factors(self, start: int = 0, stop: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(U[:, start:stop], V[start:stop]) as stored (once dense: of the tail)."""
        stop = self.columns if stop is None else stop
        return self._u.slice(start, stop).T, self._v.slice(start, stop)

    def matrix(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """L in fp32, formed on ``device`` (default: the ledger's), a new tensor callers may change
        (a resume's bf16 split does): a product over every round (once dense: over the tail), for
        export and resume only. Once dense it is the matrix plus the tail (on the ledger's device,
        bit for bit what :meth:`fold` will hold)."""
        device = self.device if device is None else device
        if self.dense is None:
            return self.u.to(device).float() @ self.v.to(device).float()
        out = self.dense.to(device, copy=True)
        if self.columns:
            out.addmm_(self.u.to(device).float(), self.v.to(device).float())
        return out

    def add(self, u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        """Append u·v (fp32 factors); ``dtype``: what they are stored in, one that holds them exactly."""
        if self.columns and dtype != self._u.dtype:
            if dtype == torch.float32:  # mixed rounds: widen to fp32 (exact), never narrow
                self._u.widen()
                self._v.widen()
            dtype = self._u.dtype
        if not self.columns:  # an empty ledger (or tail) takes the round's storage dtype
            self._u.dtype = self._v.dtype = dtype
        # converted into the chunks as they are copied
        self.last_added = self._u.append(u.T).T, self._v.append(v)

    def fold(self, densify: bool = True) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """A segment boundary. Dense: add the tail to the matrix (fp32, one rank-k update) and drop
        it; return the tail (as stored) for the caller to measure and to checkpoint. Factored:
        turn dense if ``densify`` and the factors take as many bytes as a dense fp32 matrix
        (``dense_at``; L = U·V formed once, the factors dropped); return None."""
        if self.dense is None:
            if densify and self.columns and self.dense_at(self.columns, self._u.dtype):
                self.dense = self.matrix()
                self._drop_factors()
            return None
        if not self.columns:
            return None
        tail = self.factors()
        self.dense.addmm_(tail[0].float(), tail[1].float())
        self._drop_factors()
        return tail

    def _drop_factors(self) -> None:
        self._u.replace(self._u.whole()[:0])
        self._v.replace(self._v.whole()[:0])
        self.generation += 1

    def dense_at(self, columns: int, dtype: torch.dtype) -> bool:
        """Whether ``columns`` factor pairs stored in ``dtype`` take as many bytes as a dense fp32
        matrix: bf16 factors stay factored twice as many rounds as fp32 ones (switching earlier
        would double memory). The same decision on every rank (all ranks' rows count)."""
        out_dim, in_dim = self.full_out, self._v.width
        return (torch.finfo(dtype).bits // 8) * columns * (out_dim + in_dim) >= 4 * out_dim * in_dim

    def nbytes(self) -> int:
        """Bytes held (chunks as allocated, and the dense matrix)."""
        dense = self.dense.numel() * self.dense.element_size() if self.dense is not None else 0
        return self._u.nbytes() + self._v.nbytes() + dense

    def load_dense(self, matrix: torch.Tensor) -> None:
        """Hold exactly ``matrix`` (fp32), no tail: a base a checkpoint stored. Factors arrive
        through :meth:`extend`; a resume replays the folds (merged_checkpoint.py)."""
        self.dense = matrix.to(device=self.device, dtype=torch.float32, copy=True)
        self._drop_factors()

    def clear(self) -> None:
        """Hold no round."""
        self.dense = None
        self._drop_factors()

    def extend(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Append factors as a checkpoint stored them (bf16 stays bf16 if the ledger's are, else fp32)."""
        self.add(u, v, torch.bfloat16 if u.dtype == v.dtype == torch.bfloat16 else torch.float32)
        self.last_added = None


def storage_dtype(module: nn.Module, merge_rate: float) -> torch.dtype:
    """The dtype a module's merged factors are stored in: ``module.factor_dtype(merge_rate)`` where
    the adapter defines it (a dtype that holds ``merge_factors(merge_rate)`` exactly), else fp32."""
    exact = getattr(module, "factor_dtype", None)
    return exact(merge_rate) if exact is not None else torch.float32
