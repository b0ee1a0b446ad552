"""FSDP2 on CPU: ``tune run --nproc_per_node 2 xgblora_finetune`` with gloo, against one process.

Data parallelism splits the global batch: torchtune's ``StatefulDistributedSampler`` gives rank r
the indices ``perm[r::2]`` of the same seeded permutation, so 2 ranks × batch 2 see exactly the
samples of 1 process × batch 4 in every step; the distributed recipe all-reduces the token counts
and the token-weighted loss sums, so the logged loss and the gradients are the same token mean.
What differs is only the order of floating-point sums (per-rank padding, the gloo reduction,
FSDP's reduce-scatter), measured at ≤ 2e-7 relative on the losses; the tolerances below (1e-5 on
losses, 1e-5 absolute on weights of scale 0.02) leave room for other CPUs' kernels.

NF4 bases (``model.quantize_base: True``, bf16 compute) are compared with the one-process runs
of the same configs (``conftest.single_process_run``). Each rank loads its rows of the one
single-device quantization, so the frozen NF4 weights are bit for bit the single-device ones;
what differs is bf16 arithmetic in another order (batch split, reductions), which bf16 Adam
amplifies in the adapters. Measured on 2 CPU cores: losses ≤ 3.4e-5 relative (LoRA-XS on NF4:
≤ 1.8e-5), the fp32 merged ledgers ≤ 2.2% relative per module, exported bf16 weights ≤ 8.5e-4
absolute (a few bf16 steps). Leaving the merged rounds out of the sharded forward moves the
losses by 1.2e-2 relative, so the tolerances below (2e-4 on losses, 5% on ledgers, 2e-3 on
exported weights) still separate a right run from a wrong one.

Select with ``pytest -m distributed``; the whole file takes about 4 minutes on 2 CPU cores.
"""

import json
import os
import subprocess
from pathlib import Path
from typing import Dict

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.e2e_fixture import (
    EXPORT, TUNE, chat, chat_config, kill_and_resume, losses, make_tiny_model_dir, read_metric, run_recipe, tiny_config, tiny_loraxs_config,
    tiny_nf4_config,
)
from tests.tiny_model import TINY
from torchtune_xgb.distributed.sharding import DTensor, Shard

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GOLDEN_DIR = Path(__file__).parent.parent / "golden"
GOLDEN_XGB = json.loads((GOLDEN_DIR / "tiny_xgblora_losses.json").read_text())["losses"]
GOLDEN_XS = json.loads((GOLDEN_DIR / "tiny_xgblora_xs_losses.json").read_text())["losses"]
SELECTION_LOG_ENV = "TORCHTUNE_XGB_SELECTION_LOG"
LOSS_REL = 1e-5
WEIGHT_ATOL = 1e-5
NF4_LOSS_REL = 2e-4
# NF4 runs train in bf16, where one and two processes sum gradients in a different order. Adam's
# first steps are about ±lr wherever a gradient is near zero, so one element of a rank-1 B whose
# gradient changes sign in its last bits moves a whole row of that round's update: measured on a
# 2-core AVX2 EPYC (2026-12-03), row 98 of layer 0's w1 differs by 0.8 of the row, 0.043 of the
# module's merged state (the other nine modules 0.003-0.037). One rank's rows of the export lost or
# doubled moves every module by 0.69-0.75 (measured on the same runs); 0.1 keeps those failing.
NF4_LEDGER_REL = 0.1
ADAPTED = ("q_proj", "v_proj", "mlp.")  # the tiny config's LoRA targets (HF names)
GLOBAL_BATCH = 4  # the tiny config's batch on one process


def run_distributed(cfg, cwd: Path, *extra: str, recipe: str = "xgblora_finetune", env_extra=None, nproc: int = 2):
    """``tune run --nproc_per_node <nproc> <recipe> --config <cfg>`` with the batch split over the ranks."""
    cfg = dict(cfg, batch_size=GLOBAL_BATCH // nproc)
    cfg_path = cwd / f"config_{Path(cfg['output_dir']).name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONHASHSEED="0", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(
        [TUNE, "run", "--nproc_per_node", str(nproc), "--standalone", recipe, "--config", str(cfg_path), *extra],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


def no_eval(cfg):
    cfg.pop("eval", None)
    return cfg


def with_val_loss(cfg, root: Path):
    """A held-out loss every 6 steps over 7 examples: with batch 2 per rank, rank 0 scores 4 and
    rank 1 scores 3 (one forward pass with every label ignored keeps the ranks in step)."""
    cfg["dataset_val"] = {"_component_": "torchtune_xgb.data.arithmetic_dataset", "split": "eval",
                          "n_eval": 7, "data_dir": str(root / "val_data")}
    cfg["run_val_every_n_steps"] = 6
    return cfg


@pytest.fixture(scope="module")
def single(root):
    """One process, batch 4 (the golden configuration)."""
    out = root / "single"
    result = run_recipe(with_val_loss(no_eval(tiny_config(root, out)), root), root)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def teardown_probe(directory: Path) -> Dict[str, str]:
    """Environment that makes every torchrun worker (a process with ``LOCAL_RANK``) leave a
    ``teardown.rank<N>`` file in ``directory`` if it runs interpreter teardown (atexit)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "if 'LOCAL_RANK' in os.environ:\n"
        f"    marker = os.path.join({str(directory)!r}, 'teardown.rank' + os.environ['RANK'])\n"
        "    atexit.register(lambda: open(marker, 'w').close())\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def fsdp(root):
    """Two processes, batch 2 each, with exact-match eval (generation under FSDP), the selection
    log and the teardown probe."""
    out = root / "fsdp"
    cfg = with_val_loss(tiny_config(root, out), root)
    env = {SELECTION_LOG_ENV: str(root / "selection"), **teardown_probe(root / "probe")}
    result = run_distributed(cfg, root, env_extra=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_finished_workers_skip_interpreter_teardown(root, fsdp):
    """A finished run's workers end with ``os._exit``: teardown with gloo threads still freeing
    collectives aborted 2 runs in about 60 (see ``leave_without_teardown``). torchtune's
    ``config.parse`` ends with ``sys.exit``, which once bypassed that exit on every success."""
    assert (fsdp / "xgb_summary.json").is_file()
    assert sorted(p.name for p in (root / "probe").glob("teardown.*")) == []
    # the probe itself works: a plain process with a rank runs teardown and leaves its marker
    env = dict(os.environ, LOCAL_RANK="0", RANK="7", **teardown_probe(root / "probe"))
    subprocess.run([str(Path(TUNE).parent / "python"), "-c", "pass"], env=env, check=True, timeout=120)
    assert sorted(p.name for p in (root / "probe").glob("teardown.*")) == ["teardown.rank7"]


def test_xgblora_two_processes_match_one_over_three_merges(single, fsdp):
    one, two = losses(single), losses(fsdp)
    assert len(one) == len(two) == 12
    assert two == pytest.approx(one, rel=LOSS_REL)
    assert two == pytest.approx(GOLDEN_XGB, rel=LOSS_REL)
    kept_one, kept_two = read_metric(single, "kept_fraction"), read_metric(fsdp, "kept_fraction")
    assert sorted(kept_two) == [4, 8, 12]  # three merges, each logged once (rank 0)
    assert all(v >= 0.99 for v in kept_two.values())
    for step in kept_one:  # summed over the shards: the single-device number
        assert kept_two[step] == pytest.approx(kept_one[step], abs=1e-5)
    summary = json.loads((fsdp / "xgb_summary.json").read_text())
    assert summary["rounds"] == 3 and summary["trainable_params"] == 800
    assert "exact_match_after" in summary


def test_val_loss_reduced_over_ranks_equals_one_process(single, fsdp):
    one, two = read_metric(single, "val_loss"), read_metric(fsdp, "val_loss")
    assert sorted(one) == sorted(two) == [6, 12]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=LOSS_REL), step


def test_gathered_merged_weights_equal_single_device(root, single, fsdp):
    a, b = load_file(single / EXPORT), load_file(fsdp / EXPORT)
    assert a.keys() == b.keys()  # same layout: plain model keys, no adapter keys
    base = load_file(make_tiny_model_dir(root) / "model.safetensors")
    assert a.keys() == base.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert torch.allclose(a[key], b[key], rtol=0, atol=WEIGHT_ATOL), (key, (a[key] - b[key]).abs().max())
        adapted = any(t in key for t in ("q_proj", "v_proj", "mlp."))
        assert adapted != torch.equal(b[key], base[key]), key  # the merges really moved these
    files = lambda d: sorted(p.name for p in (d / "epoch_0").iterdir())
    assert files(single) == files(fsdp)


def test_every_rank_selects_the_same_blocks(root, fsdp):
    rank0 = (root / "selection.rank0").read_text().splitlines()
    rank1 = (root / "selection.rank1").read_text().splitlines()
    assert rank0 == rank1
    records = [json.loads(line) for line in rank0]
    assert [r["round"] for r in records] == [0, 1, 2, 3]  # round 3 is activated after the last merge
    for r in records:
        assert r["active"] == r["selected"] and len(r["selected"]) == 1  # blocks_per_round = 1


def test_resume_under_fsdp_matches_uninterrupted(root, fsdp):
    # κ = 4, resume state every 3 steps: both ranks SIGKILLed after step 7, resumed from step 6
    out = kill_and_resume(run_distributed, no_eval(tiny_config(root, root / "killed")), root, fsdp, rel=1e-6)
    a, b = load_file(fsdp / EXPORT), load_file(out / EXPORT)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key


def test_a_one_process_run_resumes_on_two_processes_from_the_same_global_sample_or_is_refused(root, single):
    """``resume_allow_changes=[world_size]``: killed after step 7 on one process (batch 4), resumed
    from step 6 on two. Batch 4 per rank would double the global batch: refused in one line before
    anything loads, nothing on disk changed. Batch 2 per rank keeps it: each rank continues at the
    global sample 6 × 4 (tests/run/test_resume_layout.py checks the sampler positions), and the
    run repeats the uninterrupted one-process run."""
    from torchtune_xgb.run.faults import KILL_AT_STEP_ENV

    out = root / "one_then_two"
    cfg = no_eval(tiny_config(root, out))
    killed = run_recipe(cfg, root, env_extra={KILL_AT_STEP_ENV: "7"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    def files():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".xgb_run.lock"}

    before = files()
    allow = ("resume_from_checkpoint=True", "resume_allow_changes=[world_size]")
    refused = run_distributed(cfg, root, *allow, "batch_size=4")
    assert refused.returncode != 0  # the workers' 2 reaches the shell as torchrun's 1
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
        "error: resume_allow_changes: world_size 1 → 2 changes the global batch 4 → 8 "
        "(batch_size × processes × gradient_accumulation_steps): set batch_size=2 to keep 4"
    ]
    assert "Model is initialized" not in refused.stderr + refused.stdout and files() == before
    resumed = run_distributed(cfg, root, *allow)  # batch 2 per rank
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed at step 6" in resumed.stderr + resumed.stdout
    full, again = read_metric(single, "loss"), read_metric(out, "loss")
    assert sorted(again) == list(range(1, 13))
    assert [again[s] for s in range(7, 13)] == pytest.approx([full[s] for s in range(7, 13)], rel=LOSS_REL)
    a, b = load_file(single / EXPORT), load_file(out / EXPORT)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=WEIGHT_ATOL), key
    assert json.loads((out / "xgb_summary.json").read_text())["steps"] == 12


def test_sigterm_on_one_rank_stops_both_after_the_step_and_the_resume_matches_uninterrupted(root, fsdp):
    """A pre-empted node: SIGTERM reaches rank 1 only, mid-step 8. Both ranks finish step 8, agree
    to stop (an all-reduce of the request), save it and exit; the resume repeats the fsdp run."""
    from torchtune_xgb.run.faults import FAULT_ENV, FAULT_RANK_ENV

    out = root / "sigterm_rank1"
    cfg = no_eval(tiny_config(root, out))
    stopped = run_distributed(cfg, root, env_extra={FAULT_ENV: "term:mid_step:8", FAULT_RANK_ENV: "1"})
    assert stopped.returncode != 0
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    # every rank that is still running when it prints says so (torchrun stops the others once one exits)
    assert errors and all(e.startswith("error: stopped by SIGTERM after step 8 of 12") for e in errors), errors
    assert (out / "xgb_resume" / "latest").read_text().strip() == "step_00000008"
    assert sorted(read_metric(out, "loss")) == list(range(1, 9))
    assert not (out / "epoch_0").exists() and not (out / "xgb_summary.json").exists()
    resumed = run_distributed(cfg, root, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed at step 8" in resumed.stderr + resumed.stdout
    full, again = read_metric(fsdp, "loss"), read_metric(out, "loss")
    assert [again[s] for s in range(1, 13)] == pytest.approx([full[s] for s in range(1, 13)], rel=1e-6)
    a, b = load_file(fsdp / EXPORT), load_file(out / EXPORT)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key


def test_micro_batches_without_labels_take_the_same_decision_on_every_rank(root, tmp_path):
    """Samples whose prompt fills max_seq_len, in file order: 2 ranks × batch 2 against 1 process ×
    batch 4. Step 1: rank 0's samples (0 and 2) are both long, its micro-batch has no label token
    and adds nothing while rank 1's count (the step's loss is rank 1's alone, as one process's);
    step 2: every sample is long, both ranks skip the optimizer step (the token count is reduced)."""
    chats = [chat(i, long=i in (0, 2, 4, 5, 6, 7)) for i in range(16)]
    one = chat_config(root, tmp_path / "one", chats, shuffle=False, max_steps_per_epoch=4)
    two = chat_config(root, tmp_path / "two", chats, shuffle=False, max_steps_per_epoch=4)
    assert run_recipe(one, tmp_path).returncode == 0
    result = run_distributed(two, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    said = (result.stderr + result.stdout).count("dataset: 6 of 16 samples lose all their label tokens")
    assert said == 1  # rank 0 says it
    a, b = read_metric(tmp_path / "one", "loss"), read_metric(tmp_path / "two", "loss")
    assert sorted(a) == sorted(b) == [1, 3, 4]
    assert [b[s] for s in (1, 3, 4)] == pytest.approx([a[s] for s in (1, 3, 4)], rel=LOSS_REL)
    assert read_metric(tmp_path / "two", "skipped_steps") == {2: 1.0}
    assert json.loads((tmp_path / "two" / "xgb_summary.json").read_text())["skipped_steps"] == 1


def test_a_config_mistake_under_torchrun_is_one_line(root, tmp_path):
    out = tmp_path / "bad"
    bad = run_distributed(tiny_config(root, out), root, "boost.steps_per_round=0")
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: boost.steps_per_round: must be an integer ≥ 1, got 0"]  # not one per worker
    assert not out.exists() or not any(out.iterdir())


def test_boosted_loraxs_two_processes_match_one(root):
    out = root / "xs"
    # the explicit recipe name works as well as the dispatch from xgblora_finetune
    result = run_distributed(no_eval(tiny_loraxs_config(root, out, boosted=True)), root, recipe="xgblora_finetune_distributed")
    assert result.returncode == 0, result.stderr[-4000:]
    assert losses(out) == pytest.approx(GOLDEN_XS, rel=LOSS_REL)
    kept = read_metric(out, "kept_fraction")
    assert sorted(kept) == [4, 8, 12] and all(v >= 0.99 for v in kept.values())
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["method"] == "loraxs" and summary["trainable_params"] == 5 * 4 * 4


# --- NF4 bases under FSDP2 --------------------------------------------------------------------------

def _ledgers(output_dir: Path) -> dict:
    """Merged state L = U·V (fp32, single-device layout) per module, from the last resume state
    (factors are stored in bf16 where that is exact: the product is formed in fp32)."""
    state = torch.load(output_dir / "xgb_resume" / "step_00000012" / "state.pt", weights_only=True)  # as a resume loads it
    merged = state["booster"]["merged"]
    return {n: (s["dense"] if "dense" in s else s["u"].float() @ s["v"].float()) for n, s in merged.items()}


@pytest.fixture(scope="module")
def nf4_fsdp(root):
    """Two processes, NF4 XGBLoRA (the one-process reference: single_process_run("xgblora_nf4"))."""
    out = root / "nf4_fsdp"
    result = run_distributed(no_eval(tiny_nf4_config(root, out)), root)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_nf4_two_processes_match_one_over_three_merges(nf4_fsdp, single_process_run):
    single = single_process_run("xgblora_nf4")
    one, two = losses(single), losses(nf4_fsdp)
    assert len(one) == len(two) == 12
    assert two == pytest.approx(one, rel=NF4_LOSS_REL)
    assert two != pytest.approx(GOLDEN_XGB, rel=1e-3)  # really the NF4 model, not the fp32 one
    kept = read_metric(nf4_fsdp, "kept_fraction")
    assert sorted(kept) == [4, 8, 12] and all(v >= 0.99 for v in kept.values())
    # the merged state itself (fp32, gathered from both ranks' rows): the same updates
    l1, l2 = _ledgers(single), _ledgers(nf4_fsdp)
    assert l1.keys() == l2.keys() and len(l1) == 10
    for name in l1:
        rel = torch.linalg.matrix_norm(l2[name] - l1[name]) / torch.linalg.matrix_norm(l1[name])
        assert rel < NF4_LEDGER_REL, (name, rel.item())


def test_nf4_export_under_fsdp_equals_single_device(root, nf4_fsdp, single_process_run):
    from torchtune.models.convert_weights import _FROM_HF, get_mapped_key

    single = single_process_run("xgblora_nf4")
    a, b = load_file(single / EXPORT), load_file(nf4_fsdp / EXPORT)
    ledger = _ledgers(single)  # the single run's trained update: the scale the exports may differ by
    base = load_file(make_tiny_model_dir(root) / "model.safetensors")
    assert a.keys() == b.keys() == base.keys()  # same layout: plain model keys, no adapter keys
    files = lambda d: sorted(p.name for p in (d / "epoch_0").iterdir())
    assert files(single) == files(nf4_fsdp)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype == torch.bfloat16, key
        if any(t in key for t in ADAPTED):  # NF4 + merged rounds, trained in bf16 on another split
            # the same NF4 base under both, so the exports differ by the difference of the updates
            # (a Frobenius norm: HF's q_proj row permutation leaves it unchanged)
            update = ledger[get_mapped_key(key, _FROM_HF).removesuffix(".weight")]  # the ledger's names are torchtune's
            rel = torch.linalg.matrix_norm(a[key].float() - b[key].float()) / torch.linalg.matrix_norm(update)
            assert rel < NF4_LEDGER_REL, (key, rel.item())
        else:  # untouched weights: every rank's NF4 rows are the single-device quantization, bit for bit
            assert torch.equal(a[key], b[key]), key
        if key.endswith("proj.weight"):  # NF4 (and merged) weights: not the checkpoint's values
            assert not torch.allclose(b[key].float(), base[key].float(), atol=1e-3), key


def test_nf4_one_process_under_fsdp_matches_single_device(root, single_process_run):
    """``--nproc_per_node 1`` with an NF4 base: FSDP2 (torch >= 2.9) unshards a one-rank group from
    the first all-gather input alone, so torchao's three-input NF4 all-gather failed at the first
    forward (found on the GPU check's H200, then here with gloo)."""
    out = root / "nf4_fsdp_one"
    result = run_distributed(no_eval(tiny_nf4_config(root, out)), root, nproc=1)
    assert result.returncode == 0, result.stderr[-4000:]
    single = single_process_run("xgblora_nf4")
    assert losses(out) == pytest.approx(losses(single), rel=NF4_LOSS_REL) and len(losses(out)) == 12
    a, b = load_file(single / EXPORT), load_file(out / EXPORT)
    assert a.keys() == b.keys()
    for key in a:  # untouched NF4 weights: the single-device quantization, bit for bit
        if not any(t in key for t in ADAPTED):
            assert torch.equal(a[key], b[key]), key


def test_nf4_resume_under_fsdp_matches_uninterrupted_and_exports_onto_the_originals(root, nf4_fsdp):
    from torchtune.models.convert_weights import tune_to_hf

    cfg = no_eval(tiny_nf4_config(root, root / "nf4_killed"))
    # merge_base only changes what the export adds the merged rounds to, never the training
    cfg["adapter"] = {"merge_base": "original"}
    # κ = 4, resume state every 3 steps: both ranks SIGKILLed after step 7, resumed from step 6
    out = kill_and_resume(run_distributed, cfg, root, nf4_fsdp, rel=1e-6)
    ledgers, uninterrupted = _ledgers(out), _ledgers(nf4_fsdp)
    for name in uninterrupted:
        assert torch.allclose(ledgers[name], uninterrupted[name], rtol=0, atol=1e-7), name
    # merge_base=original: export = checkpoint weight + L (each rank's rows of both), in HF layout
    base = load_file(make_tiny_model_dir(root) / "model.safetensors")
    dims = dict(num_heads=TINY["num_heads"], num_kv_heads=TINY["num_kv_heads"], dim=TINY["embed_dim"])
    delta = tune_to_hf({f"{n}.weight": d for n, d in ledgers.items()}, **dims)
    exported, dequantized = load_file(out / EXPORT), load_file(nf4_fsdp / EXPORT)
    assert delta.keys() < exported.keys() and len(delta) == 10
    for key in exported:
        if key in delta:  # one bf16 rounding of the fp32 sum: at most one bf16 step apart
            expected = (base[key].float() + delta[key]).bfloat16().float()
            assert torch.allclose(exported[key].float(), expected, rtol=2**-7, atol=0), key
            assert not torch.allclose(exported[key].float(), dequantized[key].float(), atol=1e-3), key
        else:
            assert torch.equal(exported[key], dequantized[key]), key


def test_nf4_loraxs_two_processes_match_one(root, single_process_run):
    out = root / "nf4_xs"
    result = run_distributed(no_eval(tiny_nf4_config(root, out, method="loraxs")), root)
    assert result.returncode == 0, result.stderr[-4000:]
    single = single_process_run("loraxs_nf4")
    assert losses(out) == pytest.approx(losses(single), rel=NF4_LOSS_REL)
    kept = read_metric(out, "kept_fraction")
    assert sorted(kept) == [4, 8, 12] and all(v >= 0.99 for v in kept.values())
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["method"] == "loraxs" and summary["trainable_params"] == 5 * 4 * 4


def test_plain_loraxs_peft_adapter_under_fsdp_equals_single_device(root, single_process_run):
    out = root / "xs_plain"
    result = run_distributed(no_eval(tiny_loraxs_config(root, out, boosted=False)), root)
    assert result.returncode == 0, result.stderr[-4000:]
    single = single_process_run("loraxs_plain")
    a = load_file(single / "epoch_0" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "epoch_0" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and sum(".lora_B." in k for k in a) == 10
    for key in a:
        assert a[key].shape == b[key].shape, key  # all rows of U, not one rank's
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), (key, (a[key] - b[key]).abs().max())
        assert b[key].abs().amax(dim=1).min() > 0, key  # no row left empty
    # the same but for the base's path (each test root has its own copy of the tiny model)
    config = lambda d: {k: v for k, v in json.loads((d / "epoch_0" / "adapter" / "adapter_config.json").read_text()).items()
                        if k != "base_model_name_or_path"}
    assert config(single) == config(out)


# --- in process: one merge on a 2-rank FSDP2 model vs the same merge on one device ---------------

def _gloo_worker(rank: int, world: int, port: int, out_dir: str, body) -> None:
    """One rank of an in-process gloo group: ``body(shard)`` with ``shard`` applying FSDP2 to each
    layer and the model; what it returns is saved as ``out_dir/rank{rank}.pt``. It leaves as the
    recipe's workers do: after a barrier, through ``leave_without_teardown`` (interpreter
    finalisation racing gloo's worker thread aborts the process, SIGABRT, now and then)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from xgblora_finetune_distributed import leave_without_teardown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def shard(model):
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)

    torch.save(body(shard), f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # no collective in flight on any rank
    leave_without_teardown(0)


def _on_two_ranks(body, tmp_path) -> list:
    """``body`` run by 2 spawned gloo ranks; what each returned."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gloo_worker, args=(2, port, str(tmp_path), body), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def _sharded_merge(shard) -> dict:
    from torchtune_xgb.distributed.sharding import full, is_sharded

    out = _merge_scenario(shard)
    assert all(is_sharded(p) for p in out["popped"]), "optimizer states are keyed by the sharded params"
    out["popped"] = len(out["popped"])
    out["weights"] = {n: full(w) for n, w in out["weights"].items()}
    out["lora_a"] = {n: full(a) for n, a in out["lora_a"].items()}
    out["frozen_linear"] = _frozen_linear_scenario(shard=True)
    return out


def _frozen_linear_scenario(shard: bool) -> dict:
    """The NF4 merged path's x·Lᵀ with L's rows sharded (gathered in forward and backward) or not."""
    from torch.distributed.device_mesh import init_device_mesh

    from torchtune_xgb.distributed.sharding import linear_frozen, local_rows, rows_like

    gen = torch.Generator().manual_seed(5)
    ledger, x = torch.randn(6, 4, generator=gen), torch.randn(3, 4, generator=gen).requires_grad_()
    weight = ledger
    if shard:
        mesh = init_device_mesh("cpu", (2,))
        template = DTensor.from_local(torch.zeros(3, 4), mesh, [Shard(0)], run_check=False)
        weight = rows_like(local_rows(ledger, template), template, 6)
        assert weight.to_local().shape == (3, 4)
    out = linear_frozen(x, weight)
    (out * torch.arange(6.0)).sum().backward()
    return {"out": out.detach(), "grad": x.grad}


def _merge_scenario(shard) -> dict:
    """Build, shard (or not), train one AdamW step, end the round; return what the checks need."""
    from tests.tiny_model import tiny_lora
    from torchtune_xgb.config.boost_config import BoostConfig
    from torchtune_xgb.method.boosting import Booster
    from torchtune_xgb.distributed.sharding import local, local_rows

    model = tiny_lora(rank=1, alpha=2.0, targets=("q_proj", "v_proj"), mlp=True)
    shard(model)
    booster = Booster(model, BoostConfig(steps_per_round=1, blocks_per_round=1, seed=3)).start()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    booster.attach(opt)
    tokens = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # B = 0 after start: give every adapter a non-zero B, the same on any layout
        gen = torch.Generator().manual_seed(0)
        for module in booster.modules.values():
            b = torch.randn(module.lora_b.weight.shape, generator=gen) * 0.05
            local(module.lora_b.weight).copy_(local_rows(b, module.lora_b.weight))
    active = {n for n, m in booster.modules.items() if m.active}
    for module in booster.modules.values():  # train every adapter once, so all have optimizer state
        module.active = True
    model(tokens).float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    for name, module in booster.modules.items():
        module.active = name in active
    stateful_before = {p for p in opt.state}
    report = booster.end_round(start_next=False)
    popped = [p for p in stateful_before if p not in opt.state]
    kept = [p for p in opt.state]
    trainables_of = lambda names: {id(p) for n in names for p in booster.modules[n].trainable()}
    assert {id(p) for p in popped} == trainables_of(active)  # exactly the re-initialised adapters
    assert {id(p) for p in kept} == trainables_of(set(booster.modules) - active)  # the others keep theirs
    return {
        "popped": popped,
        "active": sorted(active),
        "kept_fraction": report.kept_fraction,
        "weights": {n: m.weight.detach() for n, m in booster.modules.items()},
        "lora_a": {n: m.lora_a.weight.detach() for n, m in booster.modules.items()},
    }


def test_shard_local_merge_and_optimizer_reset_equal_one_device(tmp_path):
    ranks = _on_two_ranks(_sharded_merge, tmp_path)
    reference = _merge_scenario(lambda m: None)
    for got in ranks:
        assert got["active"] == reference["active"]  # the same blocks on every rank
        assert got["popped"] == len(reference["popped"]) > 0
        assert got["kept_fraction"] == pytest.approx(reference["kept_fraction"], abs=1e-6)
        for key, value in _frozen_linear_scenario(shard=False).items():  # the merged path of NF4 modules
            assert torch.allclose(got["frozen_linear"][key], value, rtol=0, atol=1e-6), key
        for name, weight in reference["weights"].items():
            assert torch.allclose(got["weights"][name], weight, rtol=0, atol=1e-6), name
            assert torch.equal(got["lora_a"][name], reference["lora_a"][name]), name  # re-init: same draw


# --- in process: dense ledgers folded, checkpointed and resumed on 2 ranks vs one device -----------

def _dense_ledger_scenario(shard) -> dict:
    """90 rounds on an fp32 base (every ledger turns dense), segments every 4 rounds; checkpoint
    payloads taken at round 40 and, after 50 rounds without one (tails outgrow a quarter of their
    matrix: the matrix is written instead), at round 90; then a resume from them."""
    from tests.tiny_model import tiny_lora
    from torchtune_xgb.config.boost_config import BoostConfig
    from torchtune_xgb.distributed.sharding import local, local_rows
    from torchtune_xgb.method.boosting import Booster

    def booster_of(model):
        shard(model)
        booster = Booster(model, BoostConfig(steps_per_round=1, blocks_per_round=1, seed=3)).start()
        booster.merged.segment_rounds = 4
        return booster

    booster = booster_of(tiny_lora(rank=1, alpha=2.0, targets=("q_proj", "v_proj"), mlp=True))
    gen = torch.Generator().manual_seed(0)
    payloads, kept, outgrown = [], [], []
    for index in range(90):
        with torch.no_grad():  # the same draws on any layout: full shapes, this rank's rows
            for module in booster.modules.values():
                b = torch.randn(module.lora_b.weight.shape, generator=gen) * 0.05
                if module.active:
                    local(module.lora_b.weight).copy_(local_rows(b, module.lora_b.weight))
        booster.step += 1
        kept.append(booster.end_round().kept_fraction)
        if index in (39, 89):
            outgrown.append(sorted(booster.merged._needs_base))
            payloads += booster.segment_payloads(len(payloads))
    state = booster.state_dict()
    again = booster_of(tiny_lora(rank=1, alpha=2.0, targets=("q_proj", "v_proj"), mlp=True))
    again.load_state_dict(state, payloads)
    merged, resumed = booster.merged, again.merged
    return {
        "kept": kept, "outgrown": outgrown, "payloads": [p["merged"] for p in payloads], "state": state["merged"],
        "dense": {n: merged._gathered(n, led.dense) for n, led in merged._ledgers.items()},
        "resumed_dense": {n: resumed._gathered(n, led.dense) for n, led in resumed._ledgers.items()},
        "delta": {n: merged._gathered(n, merged.delta(n)) for n in merged._ledgers},
    }


def test_dense_ledgers_fold_save_and_resume_under_fsdp_as_on_one_device(tmp_path):
    ranks = _on_two_ranks(_dense_ledger_scenario, tmp_path)
    reference = _dense_ledger_scenario(lambda m: None)
    assert all(d is not None for d in reference["dense"].values())  # every ledger dense
    assert reference["outgrown"][1]  # some tails outgrew the bound: matrices written at round 90
    assert any("dense" in part for p in reference["payloads"] for part in p.values())
    close = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6)  # noqa: E731
    for got in ranks:
        assert got["outgrown"] == reference["outgrown"]  # the same decisions on every rank
        assert got["kept"] == pytest.approx(reference["kept"], abs=1e-6)
        assert len(got["payloads"]) == len(reference["payloads"])
        for mine, theirs in zip(got["payloads"] + [got["state"]], reference["payloads"] + [reference["state"]]):
            assert mine.keys() == theirs.keys()
            for name in theirs:  # gathered: all rows, the single-device layout
                assert mine[name].keys() == theirs[name].keys(), name
                assert all(close(mine[name][k], theirs[name][k]) for k in theirs[name]), name
        for name, matrix in reference["dense"].items():
            assert close(got["dense"][name], matrix) and close(got["delta"][name], reference["delta"][name]), name
            assert torch.equal(got["resumed_dense"][name], got["dense"][name]), name  # bit for bit on the same layout
            assert torch.equal(reference["resumed_dense"][name], matrix), name


def _returns(cfg):
    return None


def _diverges(cfg):
    from torchtune_xgb.errors import RunError

    raise RunError("diverged")


def _has_a_bug(cfg):
    raise ValueError("bug")


def _exits_5(cfg):
    raise SystemExit(5)


@pytest.mark.parametrize("body, code", [(_returns, 0), (_diverges, 1), (_has_a_bug, 1), (_exits_5, 5)])
def test_worker_main_always_leaves_through_os_exit(tmp_path, monkeypatch, body, code):
    """``xgblora_finetune_distributed.main`` reaches ``os._exit`` with the recipe's code however
    the recipe ends, including a normal return through torchtune's ``config.parse`` (which
    raises ``SystemExit``)."""
    import logging
    import sys

    import xgblora_finetune_distributed as worker
    from torchtune import config

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("seed: 0\n")
    monkeypatch.setattr(sys, "argv", ["xgblora_finetune", "--config", str(cfg_path)])
    monkeypatch.setattr(worker, "recipe_main", config.parse(body))

    class Left(BaseException):
        pass

    def fake_exit(status):
        raise Left(status)

    monkeypatch.setattr(worker.os, "_exit", fake_exit)
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # keep pytest's own log handlers open
    with pytest.raises(Left) as left:
        worker.main()
    assert left.value.args == (code,)


def test_worker_leaves_with_its_exit_code_output_flushed_and_no_teardown(tmp_path):
    """The distributed worker ends with ``os._exit`` (gloo threads outlive destroy_process_group,
    see ``leave_without_teardown``): buffered output and log records must still come out, the
    exit code must be the recipe's, and interpreter teardown (atexit) must not run."""
    log_file = tmp_path / "recipe.log"
    script = (
        "import atexit, logging, logging.handlers, sys\n"
        "from xgblora_finetune_distributed import leave_without_teardown\n"
        # a buffering handler: its record reaches the file only when logging shuts down
        f"target = logging.FileHandler({str(log_file)!r})\n"
        "logging.getLogger().addHandler(logging.handlers.MemoryHandler(1000, logging.CRITICAL, target))\n"
        "logging.getLogger().setLevel(logging.INFO)\n"
        "logging.getLogger('x').info('logged before exit')\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "sys.stdout.write('buffered, no newline')\n"
        "leave_without_teardown(3)\n"
        "print('after exit')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # piped stdout is then block-buffered
    result = subprocess.run([str(Path(TUNE).parent / "python"), "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout == "buffered, no newline"
    assert "logged before exit" in log_file.read_text()
