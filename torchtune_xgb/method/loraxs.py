"""LoRA-XS (arXiv 2405.17604): frozen SVD factors around a trainable r×r core.

In PyTorch's convention (weight W is out×in), with the truncated SVD W ≈ U_r Σ_r V_rᵀ:

    ΔW = (α/r) · B · R · A,    A = Σ_r V_rᵀ (r×in, frozen),  B = U_r (out×r, frozen),  R (r×r)

Only R is trained: r² parameters per module. ``sigma="sqrt"`` puts √Σ on each side instead
(PiSSA-style). The module is *not* a LoRA, so its tensors are named ``xs_a``/``xs_b``/``xs_core``:
torchtune's name-based helpers (``get_adapter_state_dict``, ``get_merged_lora_ckpt``) never
see a ``lora_`` key here and so can never merge it as if it were a LoRA (they would ignore R).

A and B are persistent *buffers*, not frozen parameters: they are part of every state dict
(saved with R and reloaded, never recomputed, because singular vectors have sign and rotation
ambiguity), the optimizer never sees them, and under FSDP2 they are replicated rather than
sharded — they are r/min(out, in) of the weight's size and the forward pass needs all of A.

The SVD is taken once, after the base weights load, in fp32 (exact: ``torch.linalg.svd``;
randomized: ``torch.svd_lowrank``). For boosted LoRA-XS, round k of a module uses singular block
k (columns k·r … (k+1)·r) of that one SVD (``basis="rotate"``), so the cumulative update gains
rank every round; ``basis="top"`` re-takes the top-r SVD of the current merged weight each round
(the paper-faithful variant, whose cumulative update stays inside a rank-r subspace pair).
"""

import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules.peft import AdapterModule, LoRALinear

from torchtune_xgb.config.boost_config import SVDConfig
from torchtune_xgb.distributed.sharding import any_nonzero, broadcast_from_rank0, full, local, local_rows
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.method.xgblora import frozen_base_forward

CORE_INIT_STD = 1e-5


def truncated_svd(weight: torch.Tensor, k: int, svd: SVDConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` SVD of ``weight`` in fp32: (U out×k, S k, Vh k×in), largest singular values first."""
    w = weight.detach().float()
    k = min(k, *w.shape)
    if svd.method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        # clone: a slice would keep the whole out×min(out,in) factor alive (the model's size again
        # once every module's factors are kept for the rotate basis)
        return u[:, :k].clone(), s[:k].clone(), vh[:k].clone()
    q = min(k + svd.oversample, *w.shape)
    u, s, v = torch.svd_lowrank(w, q=q, niter=svd.niter)
    return u[:, :k].clone(), s[:k].clone(), v[:, :k].T.clone()


class LoRAXSLinear(nn.Module, AdapterModule):
    """Linear layer with a frozen base W and a LoRA-XS update ``(α/r)·B·R·A``.

    Build it from a loaded ``LoRALinear`` with :meth:`from_lora_linear` (shares its weight), then
    call :meth:`set_basis` with SVD factors. ``active``/``disabled`` gate the update as in
    :class:`~torchtune_xgb.method.xgblora.XGBLoRALinear`.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, sigma: str = "input",
                 core_init: str = "normal", dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.out_dim, self.rank, self.alpha = in_dim, out_dim, rank, alpha
        self.sigma, self.core_init = sigma, core_init
        self.active, self.disabled = True, False
        self.weight: Optional[nn.Parameter] = None
        self.bias: Optional[nn.Parameter] = None
        self._quantize_base = False
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.register_buffer("xs_a", torch.zeros(rank, in_dim))
        self.register_buffer("xs_b", torch.zeros(out_dim, rank))
        self.xs_core = nn.Parameter(torch.zeros(rank, rank))

    @classmethod
    def from_lora_linear(cls, lora: LoRALinear, sigma: str, core_init: str) -> "LoRAXSLinear":
        dropout = lora.dropout.p if isinstance(lora.dropout, nn.Dropout) else 0.0
        module = cls(lora.in_dim, lora.out_dim, lora.rank, lora.alpha, sigma, core_init, dropout)
        module.weight, module.bias = lora.weight, lora.bias
        module._quantize_base = lora._quantize_base
        dtype, device = lora.lora_a.weight.dtype, lora.lora_a.weight.device
        module.to(device=device, dtype=dtype)
        module.weight, module.bias = lora.weight, lora.bias  # .to() must not copy the base
        return module

    def adapter_params(self):
        return ["xs_core"]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = frozen_base_forward(self, x)
        if not self.active or self.disabled:
            return out
        h = F.linear(self.dropout(x), self.xs_a)  # A x
        h = F.linear(h, self.xs_core)  # R A x
        return out + self.scale * F.linear(h, self.xs_b)  # B R A x

    # --- the method's update ------------------------------------------------------------
    def _b_rows(self) -> torch.Tensor:
        """B's rows for this rank's rows of W (FSDP2 shards W; B is a replicated buffer)."""
        return local_rows(self.xs_b, self.weight).float()

    def delta_weight(self) -> torch.Tensor:
        """``(α/r)·B·R·A`` in fp32 (out×in): the one definition of the LoRA-XS update (FSDP2: local rows)."""
        return self.scale * (self._b_rows() @ full(self.xs_core.detach()).float() @ self.xs_a.float())

    def update_factors(self) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """(left, right, c) with delta_weight() = c·left·right: left = B·R (this rank's rows, fp32), right = A."""
        return self._b_rows() @ full(self.xs_core.detach()).float(), self.xs_a, self.scale

    def merge_factors(self, merge_rate: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(u, v) with u·v = merge_rate · delta_weight(): u = η(α/r)·B·R (out×r), v = A (r×in), fp32."""
        left, right, c = self.update_factors()
        return (merge_rate * c) * left, right.float()

    def has_update(self) -> bool:
        return any_nonzero(local(self.xs_core.detach()), self.xs_core)

    def trainable(self):
        return [self.xs_core]

    @torch.no_grad()
    def set_basis(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        """Install frozen factors from an SVD block: A = Σ Vh (or √Σ Vh), B = U (or U √Σ)."""
        if self.sigma == "input":
            a, b = s[:, None] * vh, u
        else:
            root = s.sqrt()
            a, b = root[:, None] * vh, u * root[None, :]
        r = a.shape[0]
        self.xs_a.zero_()
        self.xs_b.zero_()
        self.xs_a[:r].copy_(a.to(self.xs_a.dtype))  # a spectrum that ran short leaves zero rows
        self.xs_b[:, :r].copy_(b.to(self.xs_b.dtype))

    @torch.no_grad()
    def reset_adapter(self, generator: Optional[torch.Generator] = None) -> None:
        """Fresh core: N(0, 1e-5²) (paper) or zeros. Either leaves the output (numerically) unchanged."""
        core = torch.zeros(self.rank, self.rank)
        if self.core_init == "normal":
            core.normal_(0.0, CORE_INIT_STD, generator=generator)
        local(self.xs_core).copy_(local_rows(core, self.xs_core).to(self.xs_core.dtype))  # FSDP2: own rows

    def adapter_state(self) -> Dict[str, torch.Tensor]:
        return {"xs_a": self.xs_a.detach().cpu(), "xs_b": self.xs_b.detach().cpu(), "xs_core": full(self.xs_core.detach()).cpu()}

    @torch.no_grad()
    def load_adapter_state(self, state: Dict[str, torch.Tensor]) -> None:
        for key in ("xs_a", "xs_b", "xs_core"):
            target = getattr(self, key)
            local(target).copy_(local_rows(state[key], target))


def convert_to_loraxs(model: nn.Module, sigma: str = "input", core_init: str = "normal") -> Dict[str, LoRAXSLinear]:
    """Replace every ``LoRALinear`` of a loaded model by a :class:`LoRAXSLinear` sharing its weight.

    The factors are not set yet (see :class:`~torchtune_xgb.method.boosting.Booster`, which owns the SVD).
    Returns the new modules by qualified name (modules that already are LoRA-XS, e.g. converted
    before FSDP2 sharding, are returned as they are).
    """
    replaced: Dict[str, LoRAXSLinear] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRAXSLinear):
            replaced[name] = module
        elif isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = LoRAXSLinear.from_lora_linear(module, sigma, core_init)
            setattr(parent, child, new)
            replaced[name] = new
    if not replaced:
        raise ConfigError("model._component_: the model has no LoRALinear modules to turn into LoRA-XS")
    return replaced


def svd_all(
    modules: Dict[str, LoRAXSLinear], blocks: int, svd: SVDConfig, weights: Optional[Dict[str, torch.Tensor]] = None
) -> Tuple[Dict[str, tuple], float]:
    """Top ``blocks·r`` SVD of every module's weight (fp32; factors kept on the CPU).

    ``weights`` overrides the matrix decomposed per module: an NF4 base is decomposed from the
    full-precision checkpoint weight it was quantized from. Returns (factors, seconds).
    """
    start = time.perf_counter()
    factors = {}
    for name, module in modules.items():
        weight = weights[name] if weights is not None and name in weights else full(module.weight.detach())
        u, s, vh = truncated_svd_once(weight, blocks * module.rank, svd, module.weight)
        factors[name] = (u.cpu(), s.cpu(), vh.cpu())
    return factors, time.perf_counter() - start


def truncated_svd_once(weight: torch.Tensor, k: int, svd: SVDConfig, like: torch.Tensor):
    """:func:`truncated_svd` of a full matrix; under FSDP2 (``like`` a DTensor) computed on rank 0
    and broadcast, so every rank holds the same factors (never one randomized SVD per rank)."""
    if local(like) is like:
        return truncated_svd(weight, k, svd)
    k = min(k, *weight.shape)
    shapes = [(weight.shape[0], k), (k,), (k, weight.shape[1])]
    return broadcast_from_rank0(lambda: truncated_svd(weight, k, svd), shapes, weight.device, like)
