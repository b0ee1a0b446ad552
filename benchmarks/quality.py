"""Quality a user can trust: task families × methods × learning rates × seeds, with intervals.

    python -m benchmarks.quality --tasks all --seeds 3 --grid --out outputs/quality.md    # the full run (~9-10 h, 2-core CPU)
    python -m benchmarks.quality --gpu --tasks all --seeds 3 --grid --out outputs/quality_gpu.md
    python -m benchmarks.quality --quick --out outputs/quality_quick.md                    # smoke test, tiny model, ~1 min
    python -m benchmarks.quality --sweep --out outputs/sweep.md                           # κ, blocks, α, lr (XGBLoRA), r (LoRA-XS)
    python -m benchmarks.quality --tasks strings --json-task mine=/data/mine --methods lora_r8 xgblora
    python -m benchmarks.quality --long --workdir outputs/quality_long --out outputs/quality_long.md  # 500 steps (quality_long.py)
    python -m benchmarks.quality --long --quick --out outputs/quality_long_quick.md                   # its smoke test, ~1 min
    python -m benchmarks.quality --long --jobs 2 …   # (family, method) groups in 2 processes at once (quality_jobs.py)

Protocol (every method, every task family of ``torchtune_xgb.data.TASKS`` or ``--json-task``):

- the same step budget, batch and data order: each run is ``steps / every`` torchtune epochs of
  ``every`` steps (torchtune reshuffles per epoch, identically in every recipe), so every method
  sees the same batches at a given seed, and torchtune's own recipes leave a checkpoint every
  ``every`` steps (torchtune 0.6.1 checkpoints per epoch only). torchtune's sampler always
  shuffles with seed 0, so the run's seed also draws the training sample (the task generator's
  seed) and, in our recipe, ``boost.seed`` (block choice, re-initialisation): seeds differ in data,
  initialisation and rounds, and a seed means the same data for every method;
- learning rate: with ``--grid`` each LR of the method's grid (``METHODS``, 3 each) is run with the
  first seed and the best on the *validation* split is kept (``quality_stats.select_lr``); the
  other seeds run at that LR only. Every figure reported is on the *test* split;
- each run's final checkpoint is scored by the same code for every method: exact match (greedy)
  and held-out answer loss on val and test; the 95% intervals bootstrap over seeds and test
  items (``quality_stats.bootstrap_interval``); a method is behind / level / ahead of torchtune
  LoRA r=8 when its interval lies below / overlaps / lies above LoRA r=8's;
- time-to-quality: test exact match and loss every ``every`` steps. Our recipe logs them itself
  (``eval.every_n_steps`` → ``exact_match``, ``dataset_val`` + ``run_val_every_n_steps`` →
  ``val_loss``, here pointed at the test split); torchtune's recipes have no such hook, so their
  per-epoch checkpoints are scored. Step 0 is the untrained model. Steps to reach LoRA r=8's final
  test exact match come from the seed-mean curves; seconds are the run's median step time × steps
  plus the merge time logged up to then (evaluations and checkpoint writes left out).

Runs go under ``--workdir`` (default ``outputs/bench/quality``); each finished run is appended to
``WORKDIR/runs.jsonl`` and skipped when the benchmark is started again with the same settings (a
crashed run is tried again; one the recipe's guard stopped for divergence is that learning rate's
result, ``diverged at step S`` in the grid table), so an interrupted full run continues where it
stopped; ``--reuse FILE`` adds the runs another record holds (a run's id is its resolved config
with paths written symbolically, so rows carry over between clones and machines of one kind).
Checkpoints are deleted once scored.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from benchmarks.common import (
    OURS,
    PLAIN_MODELS,
    REPO,
    TORCHTUNE_FULL,
    TORCHTUNE_LORA,
    Method,
    adapted_weight_entries,
    available,
    build_config,
    check_model_ready,
    clean_dir,
    config_files,
    count_params,
    defining_path,
    hardware,
    read_log,
    run_subprocess,
    tail,
    today,
    tune_command,
    with_defining_paths,
    write_config,
)
from benchmarks.quality_long import LONG_GRIDS, LONG_METHODS, LONG_QUICK_METHODS, LONG_QUICK_TASKS, LONG_TASKS, render_long
from benchmarks.quality_rank import run_effective_rank
from benchmarks.quality_stats import SLOW_FACTOR, curve_from_log, lr_past_edge, seconds_to_step, select_lr, slow_runs
from torchtune_xgb.errors import ConfigError

@functools.lru_cache(maxsize=None)
def _packaged_config(config: str):
    return OmegaConf.load(config_files()[config])


def packaged(config: str, key: str):
    """A value of a packaged config (``key`` dotted), so labels and the sweep's centre follow the
    configs users run instead of a second copy of their defaults."""
    return OmegaConf.select(_packaged_config(config), key)


# name → (row, learning-rate grid: the first is the default, used without --grid)
METHODS = {
    "lora_r8": (Method("torchtune LoRA r=8", TORCHTUNE_LORA, overrides={"model.lora_rank": 8, "model.lora_alpha": 16}),
                [1e-3, 3e-4, 3e-3]),
    "xgblora": (Method("XGBLoRA r=1 boosted", OURS), [2e-3, 1e-3, 4e-3]),
    "loraxs": (Method(f"LoRA-XS r={packaged('smollm2_135m_loraxs', 'model.lora_rank')}", OURS, "smollm2_135m_loraxs",
                      {"adapter.method": "loraxs"}), [4e-3, 1e-3, 1e-2]),
    "xgblora_xs": (Method(f"boosted LoRA-XS r={packaged('smollm2_135m_xgblora_xs', 'model.lora_rank')}", OURS,
                          "smollm2_135m_xgblora_xs", {"adapter.method": "loraxs"}),
                   [4e-3, 1e-3, 1e-2]),
    "full": (Method("full fine-tuning", TORCHTUNE_FULL), [2e-5, 1e-5, 5e-5]),
    # torchtune's α = 2r convention, as r=8's α = 16: the same scale α/r
    "lora_r32": (Method("torchtune LoRA r=32", TORCHTUNE_LORA, overrides={"model.lora_rank": 32, "model.lora_alpha": 64}),
                 [1e-3, 3e-4, 3e-3]),
}
PROTOCOL_METHODS = ["lora_r8", "xgblora", "loraxs", "xgblora_xs", "full"]  # the 60-step protocol's default


@dataclass(frozen=True)
class Setting:
    """How big a run is. ``steps`` must be a multiple of ``every`` (the curve interval)."""

    steps: int
    every: int
    batch_size: int
    device: str
    dtype: str
    model: str = "smollm2-135m"  # or "tiny": the 2-layer test model (tests/e2e_fixture.py)
    n_val: Optional[int] = None  # None: the family's size (100; facts 90)
    n_test: Optional[int] = None
    eval_batch_size: int = 25


PRESETS = {
    # 2-core CPU: 60 steps ≈ 3 min of training per run (docs/results/quality.md), curve points every 20 steps
    "cpu": Setting(steps=60, every=20, batch_size=8, device="cpu", dtype="fp32"),
    "gpu": Setting(steps=300, every=50, batch_size=16, device="cuda", dtype="bf16", eval_batch_size=100),
    "quick": Setting(steps=4, every=2, batch_size=2, device="cpu", dtype="fp32", model="tiny", n_val=6, n_test=6,
                     eval_batch_size=6),
    # --long (benchmarks/quality_long.py): 25 merged rounds at κ = 20, curve points every 50 steps;
    # batch 4: ~25 h on the 2-core CPU where batch 8 takes ~37 h (sizing in that module's docstring)
    "long": Setting(steps=500, every=50, batch_size=4, device="cpu", dtype="fp32"),
    "long_gpu": Setting(steps=500, every=50, batch_size=4, device="cuda", dtype="bf16", eval_batch_size=100),
    "long_quick": Setting(steps=6, every=2, batch_size=2, device="cpu", dtype="fp32", model="tiny", n_val=6, n_test=6,
                          eval_batch_size=6),
}
QUICK_TASKS, QUICK_METHODS = ["strings"], ["lora_r8", "xgblora"]


def parse_lrs(items: List[str]) -> Dict[str, List[float]]:
    """``["lora_r8=1e-3,3e-3", "full=1e-5"]`` → ``{"lora_r8": [1e-3, 3e-3], "full": [1e-5]}``."""
    out = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in METHODS or not values:
            raise SystemExit(f"error: --lrs {item!r}: expected METHOD=LR[,LR…] with METHOD in {', '.join(METHODS)}")
        out[name] = [float(v) for v in values.split(",")]
    return out


# --- tasks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """A task as the benchmark uses it: a generated family (``data``: arguments of ``task_dataset``
    / ``load_task_eval_examples``) or the user's files (``files``: split → path, ``columns``:
    ``(input, output)`` for column records, None for chat ``messages`` records)."""

    name: str
    data: Dict[str, Any]
    max_new_tokens: int
    arithmetic: Optional[bool]
    files: Optional[Dict[str, str]] = None
    columns: Optional[tuple] = None


def task_specs(names: List[str], json_tasks: List[str]) -> List[TaskSpec]:
    """The generated families ``names`` (``["all"]``: every one; files in the cache, ``tasks/``)
    followed by the user's ``--json-task`` items."""
    from torchtune_xgb.data.tasks import TASKS, family

    if names == ["all"]:
        names = list(TASKS)
    specs = []
    for name in names:
        fam = family(name)
        specs.append(TaskSpec(name, {"task": name}, fam.max_new_tokens, fam.arithmetic))
    return specs + [json_task_spec(item) for item in json_tasks]


JSON_TASK_HELP = ("NAME=DIR[,input=COL,output=COL][,max_new_tokens=N]: DIR holds train, val and test files "
                  "(.jsonl or .json) of chat `messages` records, or of input/output columns when named")


def json_task_spec(item: str) -> TaskSpec:
    """``--json-task`` → a TaskSpec over the user's files (read only: torchtune's ``chat_dataset`` /
    ``instruct_dataset`` for training and loss, ``json_eval_examples`` for exact match)."""
    name, _, rest = item.partition("=")
    folder, *options = rest.split(",")
    opts = dict(o.partition("=")[::2] for o in options)
    if not name or not folder or set(opts) - {"input", "output", "max_new_tokens"} or ("input" in opts) != ("output" in opts):
        raise SystemExit(f"error: --json-task {item!r}: expected {JSON_TASK_HELP}")
    if importlib.util.find_spec("torchtune_xgb.data.json_eval") is None:
        raise SystemExit("error: --json-task: torchtune_xgb.data.json_eval_examples (the eval: reader for user "
                         "files) is not in this checkout")
    files = {}
    for split in ("train", "val", "test"):
        found = [p for p in (Path(folder) / f"{split}.jsonl", Path(folder) / f"{split}.json") if p.is_file()]
        if not found:
            raise SystemExit(f"error: --json-task {name}: no {split}.jsonl or {split}.json in {folder}")
        files[split] = str(found[0].resolve())
    columns = (opts["input"], opts["output"]) if "input" in opts else None
    return TaskSpec(name, {}, int(opts.get("max_new_tokens", 32)), None, files, columns)


def dataset_cfg(task: TaskSpec, split: str, n: Optional[int]) -> Dict[str, Any]:
    """The torchtune dataset config of a task's split (``n``: size of a generated split)."""
    if task.files is None:
        cfg = {"_component_": "torchtune_xgb.data.task_dataset", "split": split, **task.data}
        return cfg if n is None else {**cfg, "n": n}
    common = {"source": "json", "data_files": task.files[split], "split": "train", "train_on_input": False}
    if task.columns is None:
        return {"_component_": "torchtune.datasets.chat_dataset", "conversation_column": "messages",
                "conversation_style": "openai", **common}
    return {"_component_": "torchtune.datasets.instruct_dataset",
            "column_map": {"input": task.columns[0], "output": task.columns[1]}, **common}


def examples_cfg(task: TaskSpec, split: str, n: Optional[int]) -> Dict[str, Any]:
    """The ``eval.examples`` config of a task's split."""
    if task.files is None:
        cfg = {"_component_": "torchtune_xgb.data.load_task_eval_examples", "split": split, **task.data}
        return cfg if n is None else {**cfg, "n": n}
    cfg = {"_component_": "torchtune_xgb.data.json_eval.json_eval_examples", "path": task.files[split]}
    if task.columns is not None:
        cfg.update(input_column=task.columns[0], output_column=task.columns[1])
    return cfg


# --- configs --------------------------------------------------------------------------------
def tiny_settings(tiny_dir: Path, model_cfg) -> Dict[str, Any]:
    """The tiny 2-layer test model in place of SmolLM2 (``--quick``), keeping the method's rank."""
    from tests.tiny_model import TINY

    if defining_path(model_cfg._component_) in PLAIN_MODELS.values():
        model = {"_component_": "torchtune.models.llama3_2._component_builders.llama3_2", **TINY}
    else:
        model = {"_component_": "torchtune.models.llama3_2._component_builders.lora_llama3_2",
                 "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True,
                 "lora_rank": model_cfg.lora_rank, "lora_alpha": model_cfg.lora_alpha, **TINY}
    return {
        "model": model,
        "tokenizer": {"_component_": "torchtune_xgb.models.chatml.chatml_tokenizer",
                      "path": str(tiny_dir / "tokenizer.json"), "max_seq_len": 128},
        "checkpointer.checkpoint_dir": str(tiny_dir),
    }


def plain_model_config(model_cfg) -> Dict[str, Any]:
    """The non-LoRA model of a run's model config (what a merged checkpoint loads into)."""
    component = defining_path(model_cfg._component_)
    if component in PLAIN_MODELS:
        return {"_component_": PLAIN_MODELS[component]}
    kwargs = {k: v for k, v in OmegaConf.to_container(model_cfg).items() if k != "_component_"}
    module, _, name = component.rpartition(".")
    if not name.startswith("lora_"):  # already a plain model
        return {"_component_": component, **kwargs}
    # a torchtune LoRA builder (the tiny test model's): the plain builder with the LoRA kwargs dropped
    plain = {k: v for k, v in kwargs.items() if not k.startswith(("lora_", "apply_lora", "quantize_base"))}
    return {"_component_": f"{module}.{name[len('lora_'):]}", **plain}


def run_config(key: str, task: TaskSpec, lr: float, seed: int, out_dir: Path, setting: Setting, args,
               overrides: Optional[Dict[str, Any]] = None, curve: bool = True):
    """The resolved config of one run: ``steps/every`` epochs of ``every`` steps on ``task``."""
    method, _ = METHODS[key]
    every = setting.every if curve else setting.steps
    cfg = build_config(method, out_dir, steps=every, batch_size=setting.batch_size, device=setting.device,
                       dtype=setting.dtype, lr=lr, seed=seed)
    # torchtune 0.6.1's sampler shuffles with a fixed seed (0), whatever `seed` says: the run's seed
    # picks the training sample itself (the generator's seed), the same for every method
    updates: Dict[str, Any] = {"epochs": setting.steps // every, "dataset": {**dataset_cfg(task, "train", None), "seed": seed}}
    if "boost" in cfg:  # block selection and re-initialisation follow the run's seed too
        updates["boost.seed"] = seed
    if setting.model == "tiny":
        updates.update(tiny_settings(args.tiny_dir, cfg.model))
        if "boost" in cfg:  # rounds that fit the short run (a config without boost stays one round)
            updates.update({"boost.steps_per_round": setting.every, "boost.rewarmup_steps": 0,
                            "boost.blocks_per_round": 1})
    if method.recipe == OURS and curve:
        updates["eval"] = {"examples": examples_cfg(task, "test", setting.n_test), "max_new_tokens": task.max_new_tokens,
                           "batch_size": setting.eval_batch_size, "every_n_steps": every}
        updates["dataset_val"] = dataset_cfg(task, "test", setting.n_test)
        updates["run_val_every_n_steps"] = every
    updates.update(overrides or {})
    for name, value in updates.items():
        OmegaConf.update(cfg, name, value, merge=False, force_add=True)
    return cfg


# --- scoring a merged checkpoint ------------------------------------------------------------
def load_merged(checkpoint_dir: Path, cfg, device: str = "cpu"):
    """The plain model with the weights of a merged checkpoint dir (as torchtune's generate does)."""
    import torch
    from torchtune import config, training
    from torchtune.training import FullModelHFCheckpointer

    files = sorted(p.name for p in Path(checkpoint_dir).glob("model*.safetensors"))
    # the checkpointer wants an output dir even to read; keep it out of the model/cache dirs
    scratch = tempfile.mkdtemp(prefix="xgb_scoring_")
    try:
        checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(checkpoint_dir), checkpoint_files=files,
                                               model_type=cfg.checkpointer.model_type, output_dir=scratch)
        with training.set_default_dtype(torch.float32):
            model = config.instantiate(OmegaConf.create(plain_model_config(cfg.model)))
        model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return model.to(device).eval()


def answer_losses(model, dataset, pad_id: int, batch_size: int = 25):
    """Per item: (summed cross-entropy over its answer tokens, answer-token count); prompts masked."""
    import torch
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

    device = next(model.parameters()).device
    sums: List[float] = []
    counts: List[int] = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = padded_collate_sft([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                                       padding_idx=pad_id)
            logits = model(batch["tokens"].to(device))[:, :-1].float()
            labels = batch["labels"][:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                     ignore_index=CROSS_ENTROPY_IGNORE_IDX, reduction="none")
            sums += loss.sum(dim=1).tolist()
            counts += (labels != CROSS_ENTROPY_IGNORE_IDX).sum(dim=1).tolist()
    return sums, counts


def score_model(model, tokenizer, task: TaskSpec, split: str, n: Optional[int], setting: Setting) -> Dict[str, Any]:
    """``{"exact_match", "loss", "correct", "item_loss", "item_tokens"}`` of ``model`` on a split."""
    from torchtune import config

    from torchtune_xgb.eval.exact_match import exact_match_details

    examples = config.instantiate(OmegaConf.create(examples_cfg(task, split, n)))
    em, records = exact_match_details(model, tokenizer, examples, max_new_tokens=task.max_new_tokens,
                                      batch_size=setting.eval_batch_size)
    dataset = config.instantiate(OmegaConf.create(dataset_cfg(task, split, n)), tokenizer)
    sums, counts = answer_losses(model, dataset, tokenizer.pad_id, setting.eval_batch_size)
    return {"exact_match": em, "loss": sum(sums) / sum(counts), "correct": [int(r["correct"]) for r in records],
            "item_loss": [s / c for s, c in zip(sums, counts)], "item_tokens": counts}


def score_checkpoint(checkpoint_dir: Path, cfg, task: TaskSpec, splits: List[str], setting: Setting) -> Dict[str, Any]:
    from torchtune import config

    model = load_merged(checkpoint_dir, cfg, setting.device)
    tokenizer = config.instantiate(cfg.tokenizer)
    sizes = {"val": setting.n_val, "test": setting.n_test}
    return {split: score_model(model, tokenizer, task, split, sizes[split], setting) for split in splits}


# --- runs -----------------------------------------------------------------------------------
def run_id(parts: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_fingerprint(cfg, out_dir: Path) -> str:
    """The resolved config as text with the run's own directory, the model cache and the checkout
    written symbolically: equal for the same run in another workdir, cache or clone (a benchmark
    can run from a worktree pinned at one commit while the checkout changes), different when any
    value that reaches the recipe changes. Components are written by their defining module's
    path (``defining_path``): the packaged configs' switch to the public aliases
    (``torchtune_xgb.lora_smollm2_135m``) left every recorded run's id as it was."""
    from torchtune_xgb.models.cache import cache_root

    text = OmegaConf.to_yaml(OmegaConf.create(with_defining_paths(OmegaConf.to_container(cfg))))
    text = text.replace(str(out_dir), "<run>").replace(str(cache_root()), "<cache>").replace(str(REPO), "<repo>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


DIVERGED = re.compile(r"^error: training diverged at step (\d+)", re.MULTILINE)
# What stops a run of our recipe, recorded in each row the guard stopped (run/guard.py): 1, the
# first loss spike (rows without the key); 2, spike_patience (2026-12-04: a spike is skipped, three
# in a row, or one on a merged, saved or exported step, stop it). A row stopped under an earlier rule
# is run again (the new rule differs only on runs the old one stopped: the rest are unchanged).
GUARD_RULE = 2


def diverged_at(stdout: str) -> Optional[int]:
    """The step at which the recipe's guard stopped a diverging run (its ``error:`` line), or None.
    A divergence is that learning rate's result, not an accident: the run is recorded as such and
    not tried again (a crash is)."""
    match = DIVERGED.search(stdout)
    return int(match.group(1)) if match else None


def read_runs(path: Path, cut_short_ok: bool = False) -> Dict[str, Dict[str, Any]]:
    """The rows of a runs record (``runs.jsonl``) by id; a later row of an id replaces an earlier one.
    ``cut_short_ok``: a last line without its newline that does not parse (the writer was killed
    while writing it) is left out; any other bad line is an error naming the file."""
    rows: Dict[str, Dict[str, Any]] = {}
    text = path.read_text() if path.is_file() or not cut_short_ok else ""
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if cut_short_ok and number == len(lines) and not text.endswith("\n"):
                print(f"  {path}: its last line is cut short (a run killed while recorded): left out")
                continue
            raise SystemExit(f"error: {path}, line {number}: not a JSON row") from None
        rows[row["id"]] = row
    return rows


class RunCache:
    """``WORKDIR/runs.jsonl``: finished runs by id, so a restarted benchmark skips them.

    ``reuse``: runs records kept elsewhere (``--reuse``: the one committed under
    ``benchmarks/results/``, or another machine's) whose rows count as this workdir's own. They are
    copied into ``WORKDIR/runs.jsonl`` (own rows win on the same id), so that file stays the whole
    record of what the report is made of, and a protocol too long for one sitting continues from a
    fresh clone."""

    def __init__(self, path: Path, reuse: Optional[List[Path]] = None):
        self.path = path
        self.rows: Dict[str, Dict[str, Any]] = read_runs(path) if path.exists() else {}
        for record in reuse or []:
            if not record.is_file():
                raise SystemExit(f"error: --reuse {record}: file not found")
            for ident, row in read_runs(record).items():
                if ident not in self.rows:
                    self.add(row)

    def add(self, row: Dict[str, Any]) -> None:
        self.rows[row["id"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def merge(self, rows: Dict[str, Dict[str, Any]]) -> int:
        """Add the ``rows`` this record lacks or holds otherwise, rewriting the file whole and
        atomically (a temporary file renamed over it: a concurrent reader sees it before or after,
        never half). Returns how many were added."""
        new = {ident: row for ident, row in rows.items() if self.rows.get(ident) != row}
        if new:
            self.rows.update(new)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows.values()))
            os.replace(tmp, self.path)
        return len(new)


def run_method(key: str, task: TaskSpec, lr: float, seed: int, setting: Setting, args, cache: RunCache,
               overrides: Optional[Dict[str, Any]] = None, curve: bool = True, label: str = "") -> Dict[str, Any]:
    """Train one run, score it (val + test, and the test curve), return its row (cached)."""
    method, _ = METHODS[key]
    out_dir = args.workdir / "runs" / f"{task.name}_{key}{label}_lr{lr:g}_seed{seed}"
    cfg = run_config(key, task, lr, seed, out_dir, setting, args, overrides, curve)
    # the id covers the resolved config itself, so a changed packaged default (or recipe setting)
    # reruns exactly the runs it affects instead of reusing a stale cached row
    ident = run_id({"key": key, "task": asdict(task), "lr": lr, "seed": seed, "setting": asdict(setting),
                    "overrides": overrides or {}, "curve": curve, "config": config_fingerprint(cfg, out_dir)})
    cached = cache.rows.get(ident)
    finished = cached and (not cached.get("failed") or cached.get("diverged_at"))  # a crash is tried again
    report_only = getattr(args, "report_only", False)
    # a run stopped under an earlier guard rule is run again (a report renders it as recorded)
    stale = finished and cached.get("diverged_at") and cached.get("guard_rule", 1) != GUARD_RULE and not report_only
    if finished and not stale and ident not in getattr(args, "rerun", ()):
        return cached
    if report_only:
        return missing_row(ident, key, task, lr, seed)
    if stale:
        print(f"  {method.name} {label} lr={lr:g} seed={seed}: the guard stopped it at step {cached['diverged_at']} under "
              f"guard rule {cached.get('guard_rule', 1)}; running it again under rule {GUARD_RULE}")
    started = time.perf_counter()
    clean_dir(out_dir)
    result = run_subprocess(tune_command(method.recipe, write_config(cfg, out_dir / "config.yaml")), out_dir / "stdout.txt")
    # the machine and torch threads the run was made with (the recipe inherits this process's
    # environment, OMP_NUM_THREADS included): a record made in parts says where each part ran
    row: Dict[str, Any] = {"id": ident, "method": method.name, "key": key, "task": task.name, "lr": lr, "seed": seed,
                           "overrides": overrides or {}, "seconds": result.wall_seconds, "out_dir": str(out_dir),
                           "hardware": hardware(setting.device)}
    epochs = sorted(out_dir.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    if result.returncode != 0 or not epochs:
        row["failed"] = True
        step = diverged_at(Path(result.stdout_path).read_text(errors="replace")) if result.returncode == 1 else None
        if step is not None:
            row["diverged_at"], row["guard_rule"] = step, GUARD_RULE
            print(f"  {method.name} {label} lr={lr:g} seed={seed}: diverged at step {step} (the recipe's guard stopped it)")
        else:
            print(f"  {method.name} {label} lr={lr:g} seed={seed}: FAILED (exit {result.returncode}); "
                  f"last lines of {result.stdout_path}:\n{tail(result.stdout_path)}")
        cache.add(row)
        return row
    final = score_checkpoint(epochs[-1], cfg, task, ["val", "test"], setting)
    row.update(val_exact_match=final["val"]["exact_match"], val_loss=final["val"]["loss"],
               test_exact_match=final["test"]["exact_match"], test_loss=final["test"]["loss"],
               test_correct=final["test"]["correct"], test_item_loss=final["test"]["item_loss"],
               test_item_tokens=final["test"]["item_tokens"])
    lines = read_log(out_dir)
    row["train_seconds"] = seconds_to_step(lines, setting.steps)  # median step time × steps + merges
    if curve:
        if method.recipe == OURS:  # the recipe's own periodic evaluation (on the test split here)
            points = {s: v for s, v in curve_from_log(lines).items() if s > 0}
        else:  # torchtune's recipes: score the checkpoint of every epoch but the last
            points = {}
            for i, ckpt in enumerate(epochs[:-1]):
                scored = score_checkpoint(ckpt, cfg, task, ["test"], setting)["test"]
                points[(i + 1) * setting.every] = {"exact_match": scored["exact_match"], "loss": scored["loss"]}
        if points.get(setting.steps, {}).get("exact_match") is not None:
            row["logged_final_exact_match"] = points[setting.steps]["exact_match"]
        points[setting.steps] = {"exact_match": row["test_exact_match"], "loss": row["test_loss"]}
        for step, point in points.items():
            seconds = seconds_to_step(lines, step)
            if seconds is not None:
                point["seconds"] = seconds
        row["curve"] = {str(s): points[s] for s in sorted(points)}
        from torchtune_xgb.eval.plot import merge_steps

        row["merges"] = merge_steps(lines)
    if method.recipe == OURS:
        summary = json.loads((out_dir / "xgb_summary.json").read_text())
        row.update(trainable_params=summary["trainable_params"], distinct_params_touched=summary["distinct_params_touched"])
    elif method.recipe == TORCHTUNE_LORA:
        row.update(trainable_params=count_params(cfg.model)["adapter"], distinct_params_touched=adapted_weight_entries(cfg.model))
    else:  # full fine-tuning trains (and may change) every parameter
        row["trainable_params"] = row["distinct_params_touched"] = count_params(cfg.model)["total"]
    # the update's effective rank (per round for boosted runs) from the last export's PEFT adapter
    rank = run_effective_rank(epochs[-1], int(cfg.model.get("lora_rank") or 0) or 1, len(row.get("merges") or []) or None)
    if rank is not None:
        row["effective_rank"] = rank
    row["total_seconds"] = time.perf_counter() - started  # training, evaluation and scoring: the sizing's unit
    if not args.keep_checkpoints:
        for ckpt in epochs:
            shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out_dir / "xgb_resume", ignore_errors=True)
    cache.add(row)
    print(f"  {method.name} {label} lr={lr:g} seed={seed}: test exact match {row['test_exact_match']:.0%}, "
          f"test loss {row['test_loss']:.3f}, val {row['val_exact_match']:.0%} ({result.wall_seconds:.0f} s)")
    return row


def missing_row(ident: str, key: str, task: TaskSpec, lr: Optional[float], seed: Optional[int]) -> Dict[str, Any]:
    """``--report-only``: a run the record lacks, not started (a failed run to the LR choice; the
    report names it as not run)."""
    name = "base (no training)" if key == "base" else METHODS[key][0].name
    return {"id": ident, "method": name, "key": key, "task": task.name, "lr": lr, "seed": seed,
            "failed": True, "missing": True}


def base_row(task: TaskSpec, setting: Setting, args, cache: RunCache) -> Dict[str, Any]:
    """The untouched model on val and test, scored like every run (the curves' step 0)."""
    ident = run_id({"key": "base", "task": asdict(task), "setting": asdict(setting)})
    if ident in cache.rows:
        return cache.rows[ident]
    if getattr(args, "report_only", False):
        return missing_row(ident, "base", task, None, None)
    cfg = run_config("full", task, 1e-5, 0, args.workdir / "base", setting, args, curve=False)
    scored = score_checkpoint(Path(cfg.checkpointer.checkpoint_dir), cfg, task, ["val", "test"], setting)
    row = {"id": ident, "method": "base (no training)", "key": "base", "task": task.name, "lr": None, "seed": None,
           "val_exact_match": scored["val"]["exact_match"], "val_loss": scored["val"]["loss"],
           "test_exact_match": scored["test"]["exact_match"], "test_loss": scored["test"]["loss"],
           "test_correct": scored["test"]["correct"], "test_item_loss": scored["test"]["item_loss"],
           "test_item_tokens": scored["test"]["item_tokens"], "trainable_params": 0}
    cache.add(row)
    return row


EDGE_STEPS = 2  # at most this many learning rates tried past the edge of a grid the best sits on


def protocol(tasks: List[TaskSpec], methods: List[str], lrs: Dict[str, List[float]], seeds: List[int],
             setting: Setting, args, cache: RunCache) -> List[Dict[str, Any]]:
    """All runs of the protocol: per task and method, the LR grid on the first seed (extended past
    an edge the val-best LR sits on, up to ``EDGE_STEPS`` values), then the other seeds at the best.

    ``--report-only`` on a partial record: while a grid run (or an edge extension) is missing, the
    learning rate is not chosen from the runs that happen to be there; the other seeds are listed
    as missing with the rate pending (``lr`` None), so the report counts them."""
    rows = []
    for task in tasks:
        rows.append(base_row(task, setting, args, cache))
        for key in methods:
            grid = lrs[key]
            print(f"{task.name} / {METHODS[key][0].name}: lr grid {grid}, seeds {seeds}")
            runs = [run_method(key, task, lr, seeds[0], setting, args, cache) for lr in grid]
            pending = len(grid) > 1 and any(r.get("missing") for r in runs)
            best = None if pending else select_lr(runs) if len(grid) > 1 else grid[0]
            for _ in range(EDGE_STEPS):  # a one-value grid has no edge (lr_past_edge: None)
                beyond = lr_past_edge([r["lr"] for r in runs], best) if best is not None else None
                if beyond is None:
                    break
                print(f"  best lr {best:g} is on the grid's edge: trying {beyond:g}")
                runs.append(run_method(key, task, beyond, seeds[0], setting, args, cache))
                pending = bool(runs[-1].get("missing"))
                best = None if pending else select_lr(runs)
                if pending:
                    break
            for run in runs:
                run["chosen"] = run["lr"] == best
            if best is not None:
                runs += [dict(run_method(key, task, best, s, setting, args, cache), chosen=True) for s in seeds[1:]]
            elif pending:
                runs += [missing_row(f"pending:{task.name}:{key}:seed{s}", key, task, None, s) for s in seeds[1:]]
            rows += runs
    return rows


# --- sweep ----------------------------------------------------------------------------------
SWEEP = {
    # factor → (method, config key, values); one factor at a time around the packaged defaults
    "κ (steps per round)": ("xgblora", "boost.steps_per_round", [5, 10, 20, 40]),
    "blocks per round": ("xgblora", "boost.blocks_per_round", ["all", 0.5, 0.34]),
    "α": ("xgblora", "model.lora_alpha", [8, 16, 32]),
    "lr": ("xgblora", "optimizer.lr", [1e-3, 2e-3, 4e-3]),
    "r (LoRA-XS)": ("loraxs", "model.lora_rank", [8, 16, 32]),
}
# the sweep's centre: the packaged defaults themselves (LoRA-XS's r from its own config)
SWEEP_DEFAULTS = {**{k: packaged("smollm2_135m_xgblora", k) for k in
                     ("boost.steps_per_round", "boost.blocks_per_round", "model.lora_alpha", "optimizer.lr")},
                  "model.lora_rank": packaged("smollm2_135m_loraxs", "model.lora_rank")}
SWEEP_TASKS = ["arithmetic", "strings"]


def sweep(tasks: List[TaskSpec], seeds: List[int], setting: Setting, args, cache: RunCache) -> List[Dict[str, Any]]:
    """One run per (task, factor value, seed); the packaged default of each factor is run once."""
    rows = []
    for task in tasks:
        for factor, (key, name, values) in SWEEP.items():
            for value in values:
                over = {name: value}
                if name == "model.lora_rank":  # LoRA-XS keeps α = r (the paper's choice)
                    over["model.lora_alpha"] = value
                lr = value if name == "optimizer.lr" else METHODS[key][1][0]
                # the packaged default of every factor is the same run: same (empty) overrides, same id
                over = {k: v for k, v in over.items() if k != "optimizer.lr" and SWEEP_DEFAULTS.get(k) != v}
                for seed in seeds:
                    row = run_method(key, task, lr, seed, setting, args, cache, overrides=over, curve=False,
                                     label="_" + ("_".join(f"{k.split('.')[-1]}{v}" for k, v in over.items()) or "default"))
                    rows.append(dict(row, factor=factor, value=value, default=value == SWEEP_DEFAULTS[name]))
    return rows


# --- command line ---------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    from torchtune_xgb.data.tasks import TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke test: tiny 2-layer model, 1 task, 2 methods, 4 steps")
    mode.add_argument("--gpu", action="store_true", help="GPU preset: cuda, bf16, 300 steps, batch 16, curve every 50")
    p.add_argument("--long", action="store_true", help="the long-budget protocol (benchmarks/quality_long.py): 500 "
                   "steps (25 rounds at κ = 20), batch 4, facts, ordering, arithmetic_fresh; LoRA r=8 and r=32, full "
                   "fine-tuning, XGBLoRA; same-density LR grids (on by default); Holm-corrected claims, effective rank. "
                   "With --quick: the tiny model; with --gpu: cuda, bf16")
    p.add_argument("--sweep", action="store_true", help="κ, blocks per round, α, lr of XGBLoRA and r of LoRA-XS")
    p.add_argument("--tasks", nargs="*", default=None, help=f"task families ({', '.join(TASKS)}, or the variant "
                   f"arithmetic_fresh) or 'all' (default: all; --sweep: {' '.join(SWEEP_TASKS)}; --long: "
                   f"{' '.join(LONG_TASKS)})")
    p.add_argument("--json-task", nargs="*", default=[], metavar="NAME=DIR", help="your own data: " + JSON_TASK_HELP)
    p.add_argument("--methods", nargs="*", default=None, choices=list(METHODS))
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; --quick 2; --sweep 1; --long --quick 1)")
    p.add_argument("--grid", action="store_true", help="each method's LR grid, best chosen on val (default: first LR)")
    p.add_argument("--lrs", nargs="*", default=[], metavar="METHOD=LR[,LR…]", help="LRs of a method, replacing its grid")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (preset: cpu 60, gpu 300, --long 500)")
    p.add_argument("--every", type=int, default=None, help="curve interval in steps (preset: cpu 20, gpu 50, --long 50)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--rerun-slow", action="store_true", help="run again the finished runs whose training took "
                   f"over {SLOW_FACTOR}x the lower quartile of their task and method (slowed by other work on the machine)")
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "quality")
    p.add_argument("--jobs", type=int, default=1, help="run the (family, method) groups in this many processes at "
                   "once (benchmarks/quality_jobs.py; e.g. 2 on a 2-core CPU, several on one GPU)")
    p.add_argument("--runs-file", type=Path, default=None, help=argparse.SUPPRESS)  # a --jobs group's own record
    p.add_argument("--reuse", nargs="*", type=Path, default=[], metavar="RUNS_JSONL",
                   help="finished runs recorded elsewhere (e.g. benchmarks/results/quality_cpu_runs.jsonl) count as "
                        "done: copied into WORKDIR/runs.jsonl, run only what they lack")
    p.add_argument("--report-only", action="store_true",
                   help="render the report from the record (WORKDIR/runs.jsonl and --reuse) and start no run: runs it "
                        "lacks are named as not run (no model needed: e.g. the committed record on a fresh clone)")
    p.add_argument("--out", type=Path, default=None, help="write the report to OUT (.md), OUT.json and OUT.png "
                   "(--long: OUT_FAMILY.png per family)")
    args = p.parse_args(argv)
    if args.long and args.sweep:
        p.error("--long runs the protocol, not the sweep")
    if args.jobs < 1 or (args.jobs > 1 and args.sweep):
        p.error("--jobs: a number >= 1, for the protocol (not --sweep)")
    name = "quick" if args.quick else "gpu" if args.gpu else "cpu"
    preset = PRESETS[{"cpu": "long", "gpu": "long_gpu", "quick": "long_quick"}[name] if args.long else name]
    setting = replace(preset, **{k: v for k, v in (("steps", args.steps), ("every", args.every),
                                                    ("batch_size", args.batch_size)) if v is not None})
    if setting.steps % setting.every:
        p.error(f"--steps {setting.steps} must be a multiple of --every {setting.every}")
    args.setting = setting
    if args.long:
        args.tasks = (LONG_QUICK_TASKS if args.quick else LONG_TASKS) if args.tasks is None else args.tasks
        args.methods = args.methods or (LONG_QUICK_METHODS if args.quick else LONG_METHODS)
        args.seeds = args.seeds or (1 if args.quick else 3)
        args.grid = args.grid or not args.quick  # the protocol chooses every method's rate
    if args.tasks is None:
        args.tasks = QUICK_TASKS if args.quick else SWEEP_TASKS if args.sweep else ["all"]
    if args.methods is None:
        args.methods = QUICK_METHODS if args.quick else PROTOCOL_METHODS
    if args.seeds is None:
        args.seeds = 2 if args.quick else 1 if args.sweep else 3
    return args


def main(argv=None) -> int:
    from benchmarks.quality_report import render_protocol, render_sweep, write_outputs

    args = parse_args(argv)
    setting: Setting = args.setting
    try:
        tasks = task_specs(args.tasks, args.json_task)
    except ConfigError as err:
        raise SystemExit(f"error: --tasks: {err}") from None
    if not tasks:
        raise SystemExit("error: --tasks: no task (name families, 'all', or add --json-task)")
    if setting.model == "tiny":
        from tests.e2e_fixture import make_tiny_model_dir

        args.tiny_dir = make_tiny_model_dir(args.workdir)
    elif not args.report_only:  # a report from the record reads no weights
        check_model_ready("smollm2-135m")
    chosen = {m.name for m in available([METHODS[k][0] for k in args.methods])}
    methods = [k for k in args.methods if METHODS[k][0].name in chosen]
    given = parse_lrs(args.lrs)
    grids = {k: LONG_GRIDS[k] if args.long else METHODS[k][1] for k in methods}
    lrs = {k: given.get(k, grids[k] if args.grid else grids[k][:1]) for k in methods}
    seeds = list(range(args.seeds))
    cache = RunCache(args.runs_file or args.workdir / "runs.jsonl", args.reuse)
    failed_groups = []
    if args.jobs > 1 and not args.report_only:
        from benchmarks.quality_jobs import describe, run_groups

        failed_groups = run_groups(tasks, methods, args, cache)
        args.report_only = True  # the groups ran everything: the report is rendered from the merged record
    slow = slow_runs(cache.rows.values())
    if slow and args.rerun_slow and not args.report_only:
        args.rerun = set(slow)
        print(f"--rerun-slow: {len(slow)} finished runs took over {SLOW_FACTOR}x their group's lower-quartile training time; "
              "rerunning those this command covers")
    elif slow:
        print(f"note: {len(slow)} finished runs took over {SLOW_FACTOR}x their group's lower-quartile training time (other work on the "
              "machine?); their seconds enter the time-to-quality medians, --rerun-slow runs them again")
    header = {"date": today(), "model": "tiny 2-layer test model" if setting.model == "tiny" else "SmolLM2-135M-Instruct", "hardware": hardware(setting.device), "setting": asdict(setting), "seeds": seeds,
              "tasks": [t.name for t in tasks], "grid": {k: lrs[k] for k in methods},
              "arithmetic": {t.name: t.arithmetic for t in tasks}, "protocol": "long" if args.long else "short"}
    if args.sweep:
        header["centre"] = dict(SWEEP_DEFAULTS)
        rows = sweep(tasks, seeds, setting, args, cache)
        report = render_sweep(rows, header)
    else:
        rows = protocol(tasks, methods, lrs, seeds, setting, args, cache)
        render = render_long if args.long else render_protocol
        report = render(rows, header, png=args.out.with_suffix(".png") if args.out else None)
    print("\n" + report)
    if args.out:
        write_outputs(args.out, report, header, rows)
    if failed_groups:
        print(f"error: --jobs: {len(failed_groups)} groups failed, their runs are missing from the report: "
              f"{describe(failed_groups)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
