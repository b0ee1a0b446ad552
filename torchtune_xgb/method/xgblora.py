"""XGBLoRA adapter: torchtune's ``LoRALinear`` plus a per-round gate.

XGBLoRA trains a fresh rank-r adapter on a random subset of blocks each round. The modules of
the other blocks keep their structure (so ``torch.compile`` and FSDP see the same module tree
every round) but are *gated off*: their adapter path is skipped entirely, which means it adds
nothing to the output and its parameters receive no gradient (``.grad`` stays ``None``, so
optimizers skip them and weight decay does not shrink them).

The module stays a ``LoRALinear`` (``lora_a``/``lora_b`` names, same state-dict keys) because it
really is one: torchtune's helpers, NF4 handling and meta-device init keep working. The stock
``lora_*`` model builders create ``LoRALinear`` modules; :func:`convert_to_xgblora` re-classes
them in place, so no builder is copied.
"""

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchao.dtypes.nf4tensor import linear_nf4
from torchtune.modules.peft import LoRALinear

from torchtune_xgb.distributed.sharding import any_nonzero, full, linear_frozen, local, local_rows


def merged_path(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Output of the merged rounds' view carried beside an NF4 weight (None when there is none).

    NF4 weights are never re-quantized with merged rounds (that would destroy them); the forward
    pass adds a view of them instead: x·Vᵀ·Uᵀ with ``merged_u`` (out×R) and ``merged_v`` (R×in),
    the rank-≤R view of method/views.LowRankView, whose shapes never change, so a step costs the
    same after 1,000 rounds as after one. The view is held in fp32 and computed in ``x``'s dtype
    (bf16 in a QLoRA run: tensor cores on a GPU, where an fp32 matmul runs ~15× slower per FLOP):
    each factor is cast per call and again in the backward, never saved cast (sharding.linear_frozen).
    Under FSDP2 ``merged_u`` is row-sharded like the weight while the forward runs on the gathered
    weight, so its rows are gathered here (in the forward and again in the backward); V is
    replicated. (The per-shape kernels that oneDNN keeps on CPUs, which made a bf16 path of a
    growing rank add memory every round, stay fixed with the view's fixed shapes.)
    """
    u = getattr(module, "merged_u", None)
    if u is None:
        return None
    return linear_frozen(linear_frozen(x, module.merged_v), u)


def frozen_base_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen base linear of an adapter module plus its merged rounds, without the live
    adapter: dense bases hold the merged rounds in the weight itself, NF4 ones beside it."""
    if not module._quantize_base:
        return F.linear(x, module.weight, module.bias)
    out = linear_nf4(input=x, weight=module.weight)
    if module.bias is not None:
        out = out + module.bias
    merged = merged_path(module, x)
    return out if merged is None else out + merged


class XGBLoRALinear(LoRALinear):
    """A ``LoRALinear`` whose adapter can be switched off for a boosting round.

    Attributes:
        active (bool): when False the adapter path is skipped: output = base linear only.
    """

    active: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = frozen_base_forward(self, x)
        if not self.active or self.disabled:
            return out
        return out + self.scale * self.lora_b(self.lora_a(self.dropout(x)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the weight, ``(alpha/r)·B·A``, in fp32 (out×in).

        This is the one definition of the method's update: merging, export and the tests use it.
        Under FSDP2 it is this rank's rows of the update (B's local rows times the gathered A).
        """
        b = local(self.lora_b.weight.detach()).float()
        a = full(self.lora_a.weight.detach()).float()
        return self.scale * (b @ a)

    def update_factors(self):
        """(left, right, c) with delta_weight() = c·left·right, as stored: B's local rows (FSDP2)
        and the gathered A, no copies (the guard measures them every step, batched)."""
        return local(self.lora_b.weight.detach()), full(self.lora_a.weight.detach()), self.scale

    def merge_factors(self, merge_rate: float):
        """(u, v) with u·v = merge_rate · delta_weight(): u = η(α/r)·B (out×r), v = A (r×in), fp32."""
        left, right, c = self.update_factors()
        return (merge_rate * c) * left.float(), right.float()

    def factor_dtype(self, merge_rate: float) -> torch.dtype:
        """The narrowest dtype that holds ``merge_factors(merge_rate)`` exactly, for the merged
        state to store them in: bf16 when B and A are bf16 and η·α/r is a power of two (scaling by
        2^k changes a bf16 value's exponent only, so η(α/r)·B is a bf16 value again), else fp32.
        The packaged configs (α/r = 16, η = 1) with bf16 adapters (NF4 and bf16 runs) get bf16:
        half the memory of fp32 factors, nothing lost."""
        c = merge_rate * self.scale
        bf16 = self.lora_b.weight.dtype == self.lora_a.weight.dtype == torch.bfloat16
        return torch.bfloat16 if bf16 and c > 0 and math.frexp(c)[0] == 0.5 else torch.float32

    def has_update(self) -> bool:
        """False while B = 0 (nothing learned since the last reset)."""
        return any_nonzero(local(self.lora_b.weight.detach()), self.lora_b.weight)  # same on every rank

    def trainable(self):
        """The parameters a round trains (and whose optimizer state a reset drops)."""
        return [self.lora_a.weight, self.lora_b.weight]

    def adapter_state(self) -> Dict[str, torch.Tensor]:
        # FSDP2: gathered, so a resume state has the single-device layout
        return {"lora_a": full(self.lora_a.weight.detach()).cpu(), "lora_b": full(self.lora_b.weight.detach()).cpu()}

    @torch.no_grad()
    def load_adapter_state(self, state: Dict[str, torch.Tensor]) -> None:
        for key in ("lora_a", "lora_b"):
            weight = getattr(self, key).weight
            local(weight).copy_(local_rows(state[key], weight))

    @torch.no_grad()
    def reset_adapter(self, generator: Optional[torch.Generator] = None) -> None:
        """Fresh adapter for a new round: A ~ Kaiming-uniform (as torchtune's LoRA init), B = 0.

        With B = 0 the module's output is unchanged. ``generator`` (a CPU generator) makes the
        draw reproducible and identical on every rank; the values are drawn on the CPU and copied,
        so the same seed gives the same A on any device.
        """
        a = self.lora_a.weight
        # kaiming_uniform_(a=sqrt(5)) as in torchtune/nn.Linear: bound = 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(a.shape[1])
        fresh = torch.empty(a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        # FSDP2: every rank draws the whole A and keeps its own rows, so A equals one device's
        local(a).copy_(local_rows(fresh, a).to(device=local(a).device, dtype=a.dtype))
        local(self.lora_b.weight).zero_()


def convert_to_xgblora(model: nn.Module) -> Dict[str, XGBLoRALinear]:
    """Re-class every ``LoRALinear`` in ``model`` as :class:`XGBLoRALinear`, in place.

    Returns the converted modules by their qualified name. Raises ValueError if the model has no
    ``LoRALinear`` (for example a non-LoRA builder was configured) or uses DoRA.
    """
    converted: Dict[str, XGBLoRALinear] = {}
    for name, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = XGBLoRALinear
            module.active = True
        if isinstance(module, XGBLoRALinear):
            converted[name] = module
        elif type(module).__name__ == "DoRALinear":
            raise ValueError("model.use_dora: XGBLoRA merges plain LoRA updates; DoRA is not supported")
    if not converted:
        raise ValueError(
            "model._component_: the model has no LoRALinear modules; use a torchtune `lora_*` "
            "builder (e.g. torchtune.models.llama3_2.lora_llama3_2_1b) with lora_attn_modules set"
        )
    return converted
