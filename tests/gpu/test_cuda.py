"""The CUDA path: merges, NF4, block selection and resume on a GPU (skipped without one).

Run by ``python -m benchmarks.gpu_check`` (part a) as ``pytest -m gpu``. Every reference is computed
on the CPU or in fp64 here, independently of the code under test; adapters are perturbed so a
merge that did nothing cannot pass.
"""

import os

import pytest
import torch

from tests.tiny_model import tiny_lora

# gpu_check --dry-run sets XGB_TEST_DEVICE=cpu to run these same tests on the CPU (their code paths,
# not the CUDA ones); CUDA-only assertions (pinned memory) are skipped then
DEVICE = os.environ.get("XGB_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))


def perturbed_booster(device, base_device="cpu", dtype=torch.bfloat16, seed=0, blocks="all"):
    from torchtune_xgb.config.boost_config import BoostConfig
    from torchtune_xgb.method.boosting import Booster

    model = tiny_lora(rank=2, alpha=4.0, targets=("q_proj", "k_proj", "v_proj", "output_proj"), mlp=True,
                      num_layers=4, dtype=dtype).to(device)
    config = BoostConfig(steps_per_round=1, blocks_per_round=blocks, seed=seed, base_device=base_device)
    return model, Booster(model, config).start()


def set_adapters(booster, round_, size=1e-2):
    """Adapters drawn on the CPU from (round, module) so CPU and CUDA runs merge the same numbers."""
    with torch.no_grad():
        for i, (name, m) in enumerate(sorted(booster.active_modules().items())):
            gen = torch.Generator().manual_seed(1000 * round_ + i)
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=gen) * size)
            m.lora_a.weight.copy_(torch.randn(m.lora_a.weight.shape, generator=gen))


@pytest.mark.parametrize("base_device", ["cpu", "cuda"])
def test_bf16_merges_on_cuda_are_one_rounding_of_the_exact_sum(base_device):
    base_device = DEVICE if base_device == "cuda" else base_device
    model, booster = perturbed_booster(DEVICE, base_device)
    w0 = {n: m.weight.detach().double().cpu() for n, m in booster.modules.items()}
    exact = {n: w.clone() for n, w in w0.items()}
    for name in booster.modules:
        # lo's codes (what the bf16 weight's rounding leaves out) and the ledger live on base_device
        stored = booster.merged._compensated.codes[name]
        assert stored.device.type == booster.merged._ledgers[name].device.type == base_device
        if base_device == "cpu" and DEVICE == "cuda":
            assert stored.is_pinned()  # asynchronous copies to the GPU and back
    for round_ in range(5):
        set_adapters(booster, round_)
        for name, m in booster.active_modules().items():
            exact[name] += (m.scale * m.lora_b.weight.double() @ m.lora_a.weight.double()).cpu()
        report = booster.end_round()
        assert report.kept_fraction >= 0.999 and report.merged_modules == len(booster.modules)
    for name, m in booster.modules.items():
        weight = m.weight.detach().cpu()
        assert m.weight.device.type == DEVICE
        assert not torch.equal(weight.double(), w0[name])  # the rounds arrived
        mismatch = (weight != exact[name].to(torch.bfloat16)).float().mean().item()
        assert mismatch < 1e-3, (name, mismatch)  # fp32 on the GPU vs fp64 here: ties may round apart


def test_cuda_merges_match_the_cpu():
    """Same adapters, same rounds: the CUDA state and weights equal the CPU ones (fp32 sums in
    another order: the ledgers to fp32 rounding, the bf16 weights to rare ties)."""
    runs = []
    for device in ("cpu", DEVICE):
        model, booster = perturbed_booster(device, blocks=2, seed=7)
        reports = []
        for round_ in range(4):
            set_adapters(booster, round_)
            reports.append(booster.end_round())
        runs.append((booster, reports))
    (cpu, cpu_reports), (gpu, gpu_reports) = runs
    assert [r.blocks for r in cpu_reports] == [r.blocks for r in gpu_reports]
    for name in cpu.modules:
        torch.testing.assert_close(gpu.merged.delta(name).cpu(), cpu.merged.delta(name), rtol=1e-5, atol=1e-8)
        differ = (gpu.modules[name].weight.cpu() != cpu.modules[name].weight).float().mean().item()
        assert differ < 1e-3, (name, differ)


def test_block_selection_and_reinit_identical_to_cpu():
    _, cpu = perturbed_booster("cpu", blocks=0.5, seed=3)
    _, gpu = perturbed_booster(DEVICE, blocks=0.5, seed=3)
    assert [cpu.selected_blocks(r) for r in range(30)] == [gpu.selected_blocks(r) for r in range(30)]
    for round_ in range(3):
        set_adapters(cpu, round_)
        set_adapters(gpu, round_)
        cpu.end_round()
        gpu.end_round()
        for name, m in cpu.modules.items():  # fresh A drawn on the CPU, copied: bit for bit
            assert torch.equal(gpu.modules[name].lora_a.weight.cpu(), m.lora_a.weight), name


def test_nf4_merges_on_cuda_keep_the_update_and_export_the_cpu_reference():
    from torchtune import training
    from torchtune.modules.peft import LoRALinear

    from torchtune_xgb.method.xgblora import convert_to_xgblora
    from torchtune_xgb.method.merged_state import MergedState
    from torchtune_xgb.quant.nf4 import fitting_nf4_blocks

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=gen) * 0.02
    with training.set_default_dtype(torch.bfloat16), fitting_nf4_blocks(), torch.device(DEVICE):
        holder = torch.nn.Module()
        holder.m = LoRALinear(512, 256, rank=1, alpha=1.0, quantize_base=True)
    with torch.no_grad():
        holder.m.weight.copy_(w.bfloat16().to(DEVICE))
    module = convert_to_xgblora(holder)["m"]
    state = MergedState({"m": module})
    w_deq = module.weight.get_original_weight().float().cpu()  # the weights training sees
    total = torch.zeros(256, 512, dtype=torch.float64)
    for _ in range(4):
        b, a = torch.randn(256, 1, generator=gen), torch.randn(1, 512, generator=gen)
        scale = 1e-2 * torch.linalg.matrix_norm(w_deq) / torch.linalg.matrix_norm(b @ a)
        with torch.no_grad():
            module.lora_b.weight.copy_((b * scale).to(DEVICE))
            module.lora_a.weight.copy_(a.to(DEVICE))
        total += module.lora_b.weight.double().cpu() @ module.lora_a.weight.double().cpu()
        report = state.merge_round(["m"])
        assert report.kept_fraction >= 0.99
        module.reset_adapter()
    exported = state.export_weight("m", torch.bfloat16).cpu()
    reference = (w_deq.double() + total).to(torch.bfloat16)  # CPU, fp64, one rounding
    assert not torch.equal(reference, w_deq.to(torch.bfloat16))
    torch.testing.assert_close(exported.float(), reference.float(), rtol=2**-8, atol=1e-6)
    x = torch.randn(3, 512, generator=gen).bfloat16()
    with torch.no_grad():  # the live NF4 forward adds the merged state beside the 4-bit weight
        got = module(x.to(DEVICE)).float().cpu()
    expected = x.double() @ (w_deq.double() + total).T
    assert torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected) < 1e-2


@pytest.mark.slow
def test_resume_on_cuda_repeats_the_uninterrupted_run(tmp_path):
    from tests.e2e_fixture import kill_and_resume, read_metric, run_recipe, tiny_config

    def cuda_config(out):
        cfg = tiny_config(tmp_path, out, device=DEVICE, dtype="bf16")
        cfg["boost"]["base_device"] = "cpu"
        return cfg

    full = tmp_path / "full"
    done = run_recipe(cuda_config(full), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    kept = read_metric(full, "kept_fraction")
    assert sorted(kept) == [4, 8, 12] and all(v >= 0.99 for v in kept.values())
    # flash-attention backward may accumulate in another order after a restart: 1e-3 relative
    # still catches a resume that restarts the round or loses the merged state (≥ 1e-2 apart)
    kill_and_resume(run_recipe, cuda_config(tmp_path / "killed"), tmp_path, full, rel=1e-3)
