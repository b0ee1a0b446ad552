"""What one all-block bf16 merge costs at Llama-3.2-1B and Llama-3-8B shapes, counted and modelled.

    python -m benchmarks.merge_cost                         # count on the CPU, model an H200
    python -m benchmarks.merge_cost --implementation /tmp/old_merged_state.py   # another MergedState
    python -m benchmarks.merge_cost --out benchmarks/results/merge_cost_model.md
    python -m benchmarks.merge_cost --device cuda --time    # on a GPU: also time real merges (gpu_check part e)

Counting (any machine, no timing): one transformer block of each shape is built with its seven
projections as bf16 XGBLoRA modules (random weights, a non-zero rank-1 adapter, ``--rounds``
earlier rounds already in the ledger), and one ``MergedState.merge_round`` over them runs under
a dispatch mode that records, for every aten operation, the bytes of the tensors it reads and
writes, the multiply-adds of matrix products, and how many out×in-sized tensors it creates; reads
of a value back to the host (``item``/``tolist``/…, each a synchronisation on a GPU) are counted
too. Blocks are identical, so a merge over all blocks costs ``num_layers`` times one block.

Modelling (the numbers a GPU would give, to be checked by ``--time`` on one): with the merged
state on the CPU, every merged weight's lo (what the bf16 weight's rounding leaves out of the exact
state, as int16 codes; method/views.py) crosses PCIe to the GPU and back (2 bytes/parameter each way, the
two directions at once); the counted bytes move
through HBM; the counted matrix products run at the fp32 rate (merges use full fp32 precision,
no TF32); each kernel costs the host a fixed time to issue (small kernels are bound by it); each
host read costs a fixed latency. Defaults are an H200's (KINDS.md / H200.md:
4.3 TB/s measured device copy, 67 TFLOP/s fp32 datasheet; PCIe Gen5 x16 ≈ 50 GB/s from pinned
memory, ≈ 10 GB/s from pageable memory, both assumptions). The merge share at κ = 50 is
merge / (merge + 50 · step); the 8B step time is either given (``--step-seconds-8b``, e.g. from
gpu_check part c scaled by :func:`scale_step_seconds`) or modelled as 4·N·T FLOPs (forward and
activation gradients of every matmul, no weight gradients: a LoRA step) at ``--mfu`` of the bf16
peak for ``--tokens`` tokens per step.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import fmt, hardware, markdown_table, today, write_report

# (num_layers, dim, kv_dim, ffn_dim, vocab); torchtune's llama3_2_1b and llama3_8b
SHAPES = {
    "llama3.2-1b": (16, 2048, 512, 8192, 128_256),
    "llama3-8b": (32, 4096, 1024, 14_336, 128_256),
}
TINY_SHAPE = {"tiny": (2, 64, 32, 128, 320)}  # --dry-run


def block_projections(dim: int, kv_dim: int, ffn_dim: int) -> Dict[str, tuple]:
    """(out, in) of the seven adapted projections of one llama block."""
    return {
        "q_proj": (dim, dim), "k_proj": (kv_dim, dim), "v_proj": (kv_dim, dim), "output_proj": (dim, dim),
        "w1": (ffn_dim, dim), "w3": (ffn_dim, dim), "w2": (dim, ffn_dim),
    }


def matmul_params(shape: tuple) -> int:
    """Parameters that take part in a matmul per token: all block projections plus the output head."""
    layers, dim, kv_dim, ffn_dim, vocab = shape
    per_block = sum(o * i for o, i in block_projections(dim, kv_dim, ffn_dim).values())
    return layers * per_block + vocab * dim


def scale_step_seconds(step_seconds: float, tokens: int, from_shape: str, to_shape: str, to_tokens: int) -> float:
    """A measured step time moved to another model shape and token count by the ratio of
    4·N·T matmul FLOPs (attention's own FLOPs and the efficiency difference are ignored)."""
    ratio = (matmul_params(SHAPES[to_shape]) * to_tokens) / (matmul_params(SHAPES[from_shape]) * tokens)
    return step_seconds * ratio


# --- counting --------------------------------------------------------------------------------
@dataclass
class Counts:
    bytes_moved: int = 0        # bytes read + written by all aten ops
    flops: int = 0              # 2·m·k·n of matrix products
    full_passes: int = 0        # ops writing an out×in-sized output (≥ the smallest module)
    host_reads: int = 0
    kernels: int = 0            # aten ops that do work on the device (views and queries left out)
    ops: Dict[str, int] = field(default_factory=dict)


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# aten ops that launch nothing on the device: views and metadata queries
NO_KERNEL = ("view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "expand", "alias", "detach",
             "unsqueeze", "squeeze", "is_pinned", "_reshape_alias", "as_strided")


class _CountingMode(TorchDispatchMode):
    def __init__(self, counts: Counts, full_size: int):
        super().__init__()
        self.counts, self.full_size = counts, full_size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        name = func.overloadpacket.__name__
        moved = sum(_nbytes(a) for a in flat_in) + sum(_nbytes(o) for o in flat_out)
        if name == "copy_":
            moved -= _nbytes(args[0])  # the destination is written, not read
        if name in NO_KERNEL:
            moved = 0  # views move nothing
        else:
            self.counts.kernels += 1
        if name in ("mm", "addmm", "addmm_", "bmm", "matmul"):
            a, b = (args[1], args[2]) if name.startswith("addmm") else (args[0], args[1])
            self.counts.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1]
        self.counts.bytes_moved += moved
        self.counts.full_passes += sum(1 for o in flat_out if o.numel() >= self.full_size and moved)
        self.counts.ops[name] = self.counts.ops.get(name, 0) + 1
        return out


def load_merged_state(implementation: Optional[Path]):
    """The MergedState class of this checkout, or of another file (to compare implementations)."""
    if implementation is None:
        from torchtune_xgb.method.merged_state import MergedState

        return MergedState
    spec = importlib.util.spec_from_file_location("merged_state_under_test", implementation)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MergedState


def build_block(shape: tuple, device: str, rank: int = 1, seed: int = 0) -> Dict[str, torch.nn.Module]:
    """The seven projections of one block as bf16 XGBLoRA modules with random weights and adapters."""
    from torchtune.modules.peft import LoRALinear

    from torchtune_xgb.method.xgblora import convert_to_xgblora

    _, dim, kv_dim, ffn_dim, _ = shape
    holder = torch.nn.Module()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        for name, (out_dim, in_dim) in block_projections(dim, kv_dim, ffn_dim).items():
            module = LoRALinear(in_dim, out_dim, rank=rank, alpha=2.0 * rank).to(torch.bfloat16)
            with torch.no_grad():
                module.weight.normal_(0.0, 0.02, generator=gen)
            holder.add_module(name, module)
    return convert_to_xgblora(holder)


def perturb_adapters(modules: Dict[str, torch.nn.Module], seed: int) -> None:
    for i, module in enumerate(modules.values()):
        gen = torch.Generator(device=module.weight.device).manual_seed(seed * 1000 + i)
        with torch.no_grad():
            module.lora_b.weight.normal_(0.0, 1e-3, generator=gen)
            module.lora_a.weight.normal_(0.0, 1.0 / module.in_dim**0.5, generator=gen)


def count_block_merge(shape: tuple, rounds: int, implementation: Optional[Path] = None, device: str = "cpu",
                      blocks: int = 1) -> Counts:
    """Counts of one merge of ``blocks`` blocks whose ledgers already hold ``rounds`` rank-1 factors
    (set directly: what a merge does depends on the ledger's rank, not on its values)."""
    state_cls = load_merged_state(implementation)
    modules = {}
    for layer in range(blocks):
        for name, module in build_block(shape, device, seed=layer).items():
            modules[f"layers.{layer}.{name}"] = module
    state = state_cls(modules, base_device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    for name, module in modules.items():
        ledger = state._ledgers[name]
        ledger.u = torch.randn(module.out_dim, rounds, generator=gen, device=device) * 1e-3
        ledger.v = torch.randn(rounds, module.in_dim, generator=gen, device=device) * 1e-3
    perturb_adapters(modules, seed=rounds)
    counts = Counts()
    smallest = min(m.weight.numel() for m in modules.values())
    with _CountingMode(counts, smallest):
        state.merge_round(list(modules))
    return counts


def host_reads(implementation: Optional[Path], layers: int) -> int:
    """Device→host reads of one merge over ``layers`` blocks, from merges over 1 and 2 tiny blocks
    (reads made once per merge and reads made per block tell apart)."""
    shape = TINY_SHAPE["tiny"]
    state_cls = load_merged_state(implementation)
    counted = []
    for blocks in (1, 2):
        modules = {}
        for layer in range(blocks):
            for name, module in build_block(shape, "cpu", seed=layer).items():
                modules[f"layers.{layer}.{name}"] = module
        state = state_cls(modules)
        perturb_adapters(modules, seed=0)
        with _count_host_reads() as reads:
            state.merge_round(list(modules))
        counted.append(reads.count)
    per_block = counted[1] - counted[0]
    return counted[0] - per_block + per_block * layers


class _count_host_reads:
    """Counts Tensor.item/tolist/__bool__/__float__ calls (each a device→host read)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __enter__(self):
        self.count, self.saved = 0, {}
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original

            def wrapper(t, *a, _o=original, **k):
                self.count += 1
                return _o(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


# --- modelling -------------------------------------------------------------------------------
@dataclass
class Hardware:
    pcie_pinned_gbs: float = 50.0
    pcie_pageable_gbs: float = 10.0
    hbm_tbs: float = 4.3
    fp32_tflops: float = 67.0
    bf16_tflops: float = 989.0
    host_read_us: float = 50.0
    # Host time per kernel a merge issues (dispatch, launch and the Python around it; small kernels
    # are bound by it on a GPU). Calibrated on the H200, gpu_check part e (8B, all 224 modules, W0
    # on the GPU): 0.100 s measured; 0.033 s of HBM bytes (140.0 GB) and fp32 GEMMs (28 GFLOP) as
    # counted here for merged_state.py of commit 698bbc8, which issued 7,171 kernels:
    # (0.100 − 0.033) / 7,171 ≈ 9.3 µs.
    kernel_us: float = 9.3


def modelled_seconds(counts: Counts, layers: int, host_bytes: int, base: str, hw: Hardware) -> float:
    """Seconds of an all-block merge from the counts of one block: lo over PCIe, each way (``base``
    'pageable': synchronous copies, added to the compute; 'pinned': asynchronous copies on a side
    stream that overlap the compute, so the slower of the two), HBM traffic and fp32 GEMMs.
    Host reads and re-initialisation are added by the caller."""
    compute = (counts.bytes_moved * layers / (hw.hbm_tbs * 1e12) + counts.flops * layers / (hw.fp32_tflops * 1e12)
               + counts.kernels * layers * hw.kernel_us * 1e-6)
    if base == "pinned":
        return max(host_bytes * layers / (hw.pcie_pinned_gbs * 1e9), compute)
    if base == "pageable":
        return 2 * host_bytes * layers / (hw.pcie_pageable_gbs * 1e9) + compute  # there and back, in turn
    return compute


def reinit_seconds(modules: int, hw: Hardware) -> float:
    """Re-initialisation + optimizer reset: each module's fresh A is drawn on the CPU and copied
    to the device (one small synchronous copy, modelled as one host round trip); the rest is
    negligible next to it."""
    return modules * hw.host_read_us * 1e-6


def modelled_step_seconds(shape: str, tokens: int, mfu: float, hw: Hardware) -> float:
    return 4 * matmul_params(SHAPES[shape]) * tokens / (mfu * hw.bf16_tflops * 1e12)


def model_rows(args, hw: Hardware) -> List[Dict[str, Any]]:
    shapes = TINY_SHAPE if args.dry_run else SHAPES
    rows = []
    for shape_name, shape in shapes.items():
        layers, dim, kv_dim, ffn_dim, _ = shape
        host_bytes = 2 * sum(o * i for o, i in block_projections(dim, kv_dim, ffn_dim).values())  # lo's int16 codes, one way
        for rounds in args.rounds:
            counts = count_block_merge(shape, rounds, args.implementation)
            # kernels are not per block: modules of one shape are measured together across blocks,
            # so one block's count and the second block's increment give all layers'
            second = count_block_merge(shape, rounds, args.implementation, blocks=2).kernels - counts.kernels
            kernels_total = counts.kernels + (layers - 1) * second
            counts.kernels = kernels_total / layers  # per block, as modelled_seconds multiplies by layers
            reads_total = host_reads(args.implementation, layers)
            row = {"shape": shape_name, "earlier_rounds": rounds, "layers": layers,
                   "lo_gb": host_bytes * layers / 1e9, "hbm_gb": counts.bytes_moved * layers / 1e9,
                   "gflop": counts.flops * layers / 1e9, "full_passes": counts.full_passes * layers,
                   "kernels": kernels_total,
                   "host_reads": reads_total}
            if shape_name in SHAPES:
                step = args.step_seconds_8b if (shape_name == "llama3-8b" and args.step_seconds_8b) else \
                    modelled_step_seconds(shape_name, args.tokens, args.mfu, hw)
                row["step_seconds"] = step
                for base in ("pageable", "pinned", "gpu"):
                    seconds = (modelled_seconds(counts, layers, host_bytes, base, hw) + reads_total * hw.host_read_us * 1e-6
                               + reinit_seconds(7 * layers, hw))
                    row[f"merge_s_{base}"] = seconds
                    row[f"share_k50_{base}"] = seconds / (seconds + 50 * step)
            rows.append(row)
            print(f"counted {shape_name}, {rounds} earlier rounds", flush=True)
    return rows


def render_model(rows: List[Dict[str, Any]], args, hw: Hardware, label: str) -> str:
    table = markdown_table(
        ["shape", "ledger rank before", "lo over PCIe, each way (GB)", "HBM traffic (GB)", "GEMM (GFLOP)",
         "out×in-sized passes", "kernels", "host reads", "step (s, modelled)", "merge + re-init s: pageable / pinned / GPU lo",
         "merge+re-init share at κ=50: pageable / pinned / GPU lo"],
        [[r["shape"], r["earlier_rounds"], fmt(r["lo_gb"], ".2f"), fmt(r["hbm_gb"], ".1f"), fmt(r["gflop"], ".0f"),
          r["full_passes"], r.get("kernels", "–"), r["host_reads"], fmt(r.get("step_seconds"), ".2f"),
          " / ".join(fmt(r.get(f"merge_s_{b}"), ".3f") or "–" for b in ("pageable", "pinned", "gpu")),
          " / ".join(fmt(r.get(f"share_k50_{b}"), ".2%") or "–" for b in ("pageable", "pinned", "gpu"))]
         for r in rows],
    )
    return "\n".join([
        f"## Merge cost model: {label}, {today()}",
        "",
        f"One merge over all blocks (seven projections each, bf16 weights, rank-1 rounds), counted on "
        f"{hardware('cpu')} by running `MergedState.merge_round` on one block under a byte/FLOP-counting "
        f"dispatch mode, × layers (kernels: merges over one and two blocks, extrapolated to all layers). Modelled hardware: PCIe {hw.pcie_pageable_gbs:g} GB/s pageable, "
        f"{hw.pcie_pinned_gbs:g} GB/s pinned; HBM {hw.hbm_tbs:g} TB/s; fp32 GEMM {hw.fp32_tflops:g} TFLOP/s; "
        f"{hw.host_read_us:g} µs per host read and per module re-initialised (a small synchronous copy); "
        f"{hw.kernel_us:g} µs of host time per kernel issued (calibrated on the H200, see Hardware.kernel_us). "
        f"Pinned lo travels on a side stream while the previous module computes (the slower of the two counts); "
        f"pageable copies are synchronous (added). Step time: 4·N·T FLOPs, T = {args.tokens} tokens/step, "
        f"{args.mfu:.0%} of {hw.bf16_tflops:g} TFLOP/s bf16"
        + (f" (8B: given, {args.step_seconds_8b:.3f} s)" if args.step_seconds_8b else "") + ".",
        "",
        table,
        "",
    ])


# --- timing on a GPU (gpu_check part e) ------------------------------------------------------
def time_merges(shape_name: str, bases: List[str], device: str, repeats: int = 2, layers: Optional[int] = None,
                deadline: Optional[float] = None) -> List[Dict[str, Any]]:
    """Seconds of real all-block merges (``layers`` blocks, default the shape's) with the merged
    state (lo) in each of ``bases`` ('pageable' CPU, 'pinned' CPU, 'gpu': the weights' device), and of re-initialising
    every adapter after it (as ``Booster.end_round`` does: fresh A drawn on the CPU and copied, B = 0).
    The first merge of each is a warm-up and not reported. A base whose turn comes when less
    than 1.5× the previous base's time is left before ``deadline`` (perf_counter) is skipped."""
    shape = {**SHAPES, **TINY_SHAPE}[shape_name]
    layers = layers or shape[0]
    state_cls = load_merged_state(None)
    results = []
    modules: Dict[str, torch.nn.Module] = {}
    for layer in range(layers):
        for name, module in build_block(shape, device, seed=layer).items():
            modules[f"layers.{layer}.{name}"] = module
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    previous = 0.0
    for base in bases:
        began = time.perf_counter()
        if deadline is not None and deadline - began < 1.5 * previous:
            print(f"  lo {base}: skipped ({deadline - began:.0f} s left)", flush=True)
            continue
        state = state_cls(modules, base_device=device if base == "gpu" else "cpu")
        lo = state._compensated.codes
        if base == "pageable":  # the same codes without page-locking
            state._compensated.codes = lo = {n: torch.empty(t.shape, dtype=t.dtype).copy_(t) for n, t in lo.items()}
        pinned = cuda and base != "gpu" and all(t.is_pinned() for t in lo.values())
        seconds, reset_seconds = [], []
        for r in range(repeats + 1):
            perturb_adapters(modules, seed=r)
            sync()
            start = time.perf_counter()
            report = state.merge_round(list(modules))
            sync()
            merged = time.perf_counter()
            gen = torch.Generator().manual_seed(r)
            for module in modules.values():
                module.reset_adapter(gen)
            sync()
            if r:
                seconds.append(merged - start)
                reset_seconds.append(time.perf_counter() - merged)
        results.append({"shape": shape_name, "layers": layers, "base": base, "pinned": pinned,
                        "seconds": seconds, "reset_seconds": reset_seconds, "reported_seconds": report.seconds,
                        "kept_fraction": report.kept_fraction, "modules": report.modules})
        print(f"  {shape_name} lo {base}: {min(seconds):.3f} s per all-block merge, re-init {min(reset_seconds):.3f} s "
              f"(kept {report.kept_fraction:.6f})", flush=True)
        del state
        if cuda:
            torch.cuda.empty_cache()
        previous = time.perf_counter() - began
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, nargs="*", default=[1, 100], help="ledger rank before the merge (default 1 100)")
    p.add_argument("--tokens", type=int, default=8 * 2048, help="tokens per optimizer step of the modelled run")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of the bf16 peak a training step reaches")
    p.add_argument("--step-seconds-8b", type=float, default=None, help="use this 8B step time instead of the model")
    p.add_argument("--implementation", type=Path, default=None, help="a merged_state.py to count instead of this checkout's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--time", action="store_true", help="also time real all-block merges at 8B shape (GPU)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    hw = Hardware()
    label = "this checkout" if args.implementation is None else str(args.implementation)
    rows = model_rows(args, hw)
    text = render_model(rows, args, hw, label)
    timed = []
    if args.time:
        timed = time_merges("tiny" if args.dry_run else "llama3-8b", ["pageable", "pinned", "gpu"], args.device)
    print(text)
    if args.out:
        write_report(args.out, text, {"rows": rows, "timed": timed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
