"""LoRA-XS SVD initialisation: exact vs randomized, on every target module of SmolLM2-135M.

Prints the time of each method, their ratio, and the largest principal angle between the two
top-r bases (left and right singular subspaces) over all modules. With ``--shape-7b`` it also
times one module of each Mistral-7B projection shape (random weights with a decaying spectrum)
and extrapolates to 32 layers.

    .venv/bin/python -m benchmarks.svd_init [--rank 16] [--niter 4] [--oversample 8] [--shape-7b]

Needs the converted model (``tune-xgb prepare smollm2-135m-instruct``).
"""

import argparse
import platform
import time
from datetime import date

import torch
from safetensors.torch import load_file

from torchtune_xgb.config.boost_config import SVDConfig
from torchtune_xgb.method.loraxs import truncated_svd
from torchtune_xgb.models.cache import cache_path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MISTRAL_7B_SHAPES = {  # (out, in) and how many per layer
    "q/o 4096×4096": ((4096, 4096), 2),
    "k/v 1024×4096": ((1024, 4096), 2),
    "gate/up 14336×4096": ((14336, 4096), 2),
    "down 4096×14336": ((4096, 14336), 1),
}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (rad) between the column spaces of orthonormal a and b."""
    cosines = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    return torch.arccos(cosines.min()).item()


def compare(weight: torch.Tensor, rank: int, randomized: SVDConfig):
    """(exact s, randomized s, largest principal angle, captured-energy ratio, gap σ_r/σ_{r+1})."""
    t0 = time.perf_counter()
    ue, se, vhe = truncated_svd(weight, rank + 1, SVDConfig(method="exact"))
    t1 = time.perf_counter()
    ur, sr, vhr = truncated_svd(weight, rank, randomized)
    t2 = time.perf_counter()
    angle = max(largest_angle(ue[:, :rank], ur), largest_angle(vhe[:rank].T, vhr.T))
    # what LoRA-XS keeps of the weight: ‖U_r U_rᵀ W V_r V_rᵀ‖² relative to the exact top-r
    energy = (sr.square().sum() / se[:rank].square().sum()).item()
    return t1 - t0, t2 - t1, angle, energy, (se[rank - 1] / se[rank]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--niter", type=int, default=4)
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--shape-7b", action="store_true")
    args = parser.parse_args()
    randomized = SVDConfig(method="randomized", niter=args.niter, oversample=args.oversample)

    weights = load_file(cache_path("smollm2-135m-instruct") / "model.safetensors")
    modules = {k: w.float() for k, w in weights.items() if any(f"{t}.weight" in k for t in TARGETS)}
    rows = [compare(w, args.rank, randomized) for w in modules.values()]
    exact_s, rand_s = sum(r[0] for r in rows), sum(r[1] for r in rows)
    angles = sorted(r[2] for r in rows)
    energy = min(r[3] for r in rows)
    # modules whose r-th and (r+1)-th singular values are within 1%: their top-r subspace is
    # ill-defined, so no method (not even two exact solvers) can pin it down
    separated = [r[2] for r in rows if r[4] > 1.01]
    print(f"# LoRA-XS SVD init — {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}")
    print(f"rank {args.rank}, randomized: niter {args.niter}, oversample {args.oversample}\n")
    print("| model | modules | exact s | randomized s | speed-up | largest angle (rad): all / median / gap>1% | min captured energy |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| SmolLM2-135M | {len(modules)} | {exact_s:.2f} | {rand_s:.2f} | {exact_s / rand_s:.1f}× | "
        f"{angles[-1]:.2e} / {angles[len(angles) // 2]:.2e} / {max(separated, default=0):.2e} ({len(separated)} modules) | {energy:.4f} |"
    )
    if args.shape_7b:
        gen = torch.Generator().manual_seed(0)
        total_e = total_r = 0.0
        for label, ((out_dim, in_dim), per_layer) in MISTRAL_7B_SHAPES.items():
            # a decaying spectrum like trained weights (a flat one makes any top-r basis arbitrary)
            k = min(out_dim, in_dim)
            u = torch.linalg.qr(torch.randn(out_dim, k, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(in_dim, k, generator=gen))[0]
            weight = (u * torch.logspace(0, -2, k)) @ v.T
            e, r, angle, captured, _ = compare(weight, args.rank, randomized)
            total_e, total_r = total_e + 32 * per_layer * e, total_r + 32 * per_layer * r
            print(f"| 7B shape {label} | 1 | {e:.2f} | {r:.2f} | {e / r:.1f}× | {angle:.2e} | {captured:.4f} |")
        print(f"| Mistral-7B, 32 layers × 7 (extrapolated) | 224 | {total_e:.0f} | {total_r:.0f} | {total_e / total_r:.1f}× | | |")


if __name__ == "__main__":
    main()
