"""What throughput.py and quality.py share: methods as table rows, generated configs, runs, logs.

A method is one row: ``Method(name, recipe, config, overrides)``. Every run gets a YAML generated
from one of our packaged configs (same model, tokenizer, data, batch, sequence length, dtype,
optimizer and steps for every row), with everything interpolated so torchtune's own recipes can
read it (they know nothing of our ``${xgb_cache:…}`` resolver), then ``tune run RECIPE --config
FILE`` in a subprocess. Rows whose packaged config is not installed yet (LoRA-XS while it is
being built) are skipped with a printed note.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from torchtune_xgb.config.names import packaged_configs
from torchtune_xgb.eval.plot import MetricLine, read_metric_log
from torchtune_xgb.models.cache import cache_path, register_resolvers

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = "smollm2_135m_xgblora"
LOG_FILE = "metrics.txt"
TORCHTUNE_LORA = "lora_finetune_single_device"
TORCHTUNE_FULL = "full_finetune_single_device"
OURS = "xgblora_finetune"
# Keys only our recipe understands; torchtune's recipes get configs without them.
OUR_KEYS = ("boost", "eval", "adapter", "save_every_n_steps")
GIB = 1024**3


@dataclass(frozen=True)
class Method:
    """One row of a benchmark table.

    Args:
        name: the row label.
        recipe: ``tune run`` recipe name, or ``"floor"`` (in-process bare frozen base).
        config: the packaged config the run's YAML starts from.
        overrides: dotted keys → values applied on top (e.g. ``{"model.lora_rank": 8}``).
    """

    name: str
    recipe: str
    config: str = BASE_CONFIG
    overrides: Mapping[str, Any] = field(default_factory=dict)


def config_files() -> Dict[str, Path]:
    """Packaged config name → YAML path. From the installed package, or from the checkout's
    ``configs/`` when ``torchtune_xgb`` is imported from the source tree of a non-editable
    install (the GPU machine: the wheel in a --target dir, the benchmarks from the checkout)."""
    try:
        return packaged_configs()
    except ModuleNotFoundError:
        return {p.stem: p for p in sorted((REPO / "configs").glob("*.yaml"))}


def available(methods: Sequence[Method]) -> List[Method]:
    """The methods whose packaged config exists; prints a note for each one skipped."""
    configs = config_files()
    keep = []
    for method in methods:
        if method.config in configs:
            keep.append(method)
        else:
            print(f"note: skipping {method.name}: packaged config {method.config!r} is not installed yet")
    return keep


# --- configs --------------------------------------------------------------------------------
def model_settings(model: str) -> Dict[str, Any]:
    """Overrides that select the model: ``smollm2-135m`` (converted, real) or ``1b-random``."""
    if model == "smollm2-135m":
        return {}
    if model == "1b-random":
        from benchmarks.random_1b import random_1b_dir

        ckpt = random_1b_dir()
        return {
            "model._component_": "torchtune.models.llama3_2.lora_llama3_2_1b",
            "checkpointer.checkpoint_dir": str(ckpt),
            "tokenizer.path": str(ckpt / "tokenizer.json"),
        }
    raise ValueError(f"--model: unknown {model!r} (smollm2-135m, 1b-random)")


def defining_path(component: str) -> str:
    """A ``_component_`` path written as the path of the module that defines it when it names one
    of torchtune_xgb's public aliases (``torchtune_xgb.lora_smollm2_135m``, as the packaged
    configs spell it, → ``torchtune_xgb.models.smollm2.lora_smollm2_135m``); any other path as
    given. Both spellings build the same thing, so what is keyed by a component (``PLAIN_MODELS``,
    a quality run's id) reads this one and does not change when a config switches spelling."""
    package, _, name = component.rpartition(".")
    if package != "torchtune_xgb":
        return component
    import torchtune_xgb

    target = getattr(torchtune_xgb, name, None)
    module = sys.modules.get(getattr(target, "__module__", None) or "")
    # the alias's name in its defining module (an alias of another function keeps its own name)
    return f"{module.__name__}.{name}" if module is not None and getattr(module, name, None) is target else component


def with_defining_paths(node: Any) -> Any:
    """A plain config container (dicts, lists) with every ``_component_`` through :func:`defining_path`."""
    if isinstance(node, dict):
        return {k: defining_path(v) if k == "_component_" and isinstance(v, str) else with_defining_paths(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [with_defining_paths(v) for v in node]
    return node


PLAIN_MODELS = {
    # the non-LoRA builder of each LoRA builder, for full fine-tuning and the bare-base floor
    "torchtune_xgb.models.smollm2.lora_smollm2_135m": "torchtune_xgb.models.smollm2.smollm2_135m",
    "torchtune.models.llama3_2.lora_llama3_2_1b": "torchtune.models.llama3_2.llama3_2_1b",
}


def build_config(
    method: Method,
    output_dir: Path,
    *,
    steps: int,
    batch_size: int,
    device: str,
    dtype: str,
    lr: Optional[float] = None,
    seed: int = 0,
    model: str = "smollm2-135m",
    keep_eval: bool = False,
    extra: Optional[Mapping[str, Any]] = None,
) -> DictConfig:
    """The fully resolved config of one run (a plain DictConfig with no interpolations left).

    Common to all rows: ``steps`` optimizer steps in one epoch, ``batch_size``, ``device``,
    ``dtype``, ``seed``, metric log ``output_dir/logs/metrics.txt`` with a timestamp per line,
    no mid-run checkpoints, no evaluation unless ``keep_eval`` (our recipe's ``eval:`` block).
    ``extra``: dotted keys → values for every row (``--set``), applied before the row's own.
    """
    register_resolvers()
    cfg = OmegaConf.load(config_files()[method.config])
    settings: Dict[str, Any] = {
        "output_dir": str(output_dir),
        "epochs": 1,
        "max_steps_per_epoch": steps,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "seed": seed,
        "resume_from_checkpoint": False,
        "save_every_n_steps": None,
        "log_every_n_steps": 1,
        "log_peak_memory_stats": device.startswith("cuda"),
        "metric_logger": {
            "_component_": "benchmarks.timed_logger.TimedDiskLogger",
            "log_dir": str(output_dir / "logs"),
            "filename": LOG_FILE,
        },
        **model_settings(model),
        **dict(extra or {}),
        **dict(method.overrides),
    }
    if lr is not None:
        settings["optimizer.lr"] = lr
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    OmegaConf.resolve(cfg)
    if method.recipe != OURS:
        for key in OUR_KEYS:
            cfg.pop(key, None)
    if method.recipe in (TORCHTUNE_FULL, "floor"):
        cfg.model = {"_component_": PLAIN_MODELS[defining_path(cfg.model._component_)]}
    if method.recipe == TORCHTUNE_FULL:
        cfg.optimizer_in_bwd = False
    if not keep_eval:
        cfg.pop("eval", None)
    return cfg


def parse_sets(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``["a.b=1", "c={x: 2}"]`` → ``{"a.b": 1, "c": {"x": 2}}`` (values parsed as JSON, else as
    YAML: JSON first, because YAML 1.1 reads ``1e-05`` as a string)."""
    import json

    import yaml

    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = yaml.safe_load(value)
    return out


def write_config(cfg: DictConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)
    return path


def check_model_ready(model: str) -> None:
    """Exit with a hint when the default model has not been converted yet."""
    if model == "smollm2-135m" and not (cache_path("smollm2-135m-instruct") / "config.json").exists():
        sys.exit(
            f"error: {cache_path('smollm2-135m-instruct')} missing: run `tune-xgb prepare smollm2-135m-instruct` "
            "(set TORCHTUNE_XGB_CACHE to use another cache)"
        )


# --- runs -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One subprocess run: exit code, wall seconds, peak RSS in bytes (whole process), log path."""

    returncode: int
    wall_seconds: float
    peak_rss_bytes: int
    stdout_path: Path


def tune_command(recipe: str, config_path: Path) -> List[str]:
    tune = Path(sys.executable).with_name("tune")
    return [str(tune) if tune.exists() else "tune", "run", recipe, "--config", str(config_path)]


def run_subprocess(cmd: List[str], stdout_path: Path, extra_env: Optional[Mapping[str, str]] = None) -> RunResult:
    """Run ``cmd`` with the repo on PYTHONPATH; peak RSS comes from ``wait4`` on that child alone.

    (``getrusage(RUSAGE_CHILDREN)`` would give the maximum over *all* children so far, and
    ``tune run`` executes the recipe in its own process, so the child's own peak is the run's.)
    """
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    stdout_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(stdout_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux
    return RunResult(proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024, stdout_path)


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


# --- log metrics ----------------------------------------------------------------------------
def step_seconds(lines: List[MetricLine], skip: int = 3) -> List[float]:
    """Wall seconds of each step after the first ``skip`` (warm-up) steps.

    A step's time is the difference between its ``time`` stamp and the previous step's, so it
    covers everything between two log lines: data, forward, backward, optimizer, merges. Step 1
    has no predecessor and is never counted.
    """
    stamps = {}
    for step, values in lines:
        if "loss" in values and "time" in values:
            stamps.setdefault(step, values["time"])
    return [stamps[s] - stamps[s - 1] for s in sorted(stamps) if s > max(skip, 1) and s - 1 in stamps]


def logged_median(lines: List[MetricLine], key: str, skip: int = 3) -> Optional[float]:
    """Median of ``key`` over the step lines after ``skip`` warm-up steps (None if never logged)."""
    values = [v[key] for s, v in lines if s > skip and "loss" in v and key in v]
    return statistics.median(values) if values else None


def logged_max(lines: List[MetricLine], key: str) -> Optional[float]:
    values = [v[key] for _, v in lines if key in v]
    return max(values) if values else None


def merge_seconds_from_log(lines: List[MetricLine]) -> float:
    """merge + re-init + optimizer reset seconds of all merges logged (lines with kept_fraction)."""
    return sum(v.get("merge_seconds", 0.0) + v.get("reset_seconds", 0.0) for _, v in lines if "kept_fraction" in v)


def read_log(output_dir: Path) -> List[MetricLine]:
    return read_metric_log(Path(output_dir) / "logs" / LOG_FILE)


# --- counting -------------------------------------------------------------------------------
def count_params(model_cfg: DictConfig) -> Dict[str, int]:
    """``{"total", "adapter"}`` parameter counts of a model config, built on the meta device."""
    import torch
    from torchtune import config

    with torch.device("meta"):
        model = config.instantiate(model_cfg)
    total = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora" in n or "magnitude" in n)
    return {"total": total, "adapter": adapter}


def adapted_weight_entries(model_cfg: DictConfig) -> int:
    """Entries of the base weights under LoRA adapters: what a dense LoRA merge changes."""
    import torch
    from torchtune import config
    from torchtune.modules.peft import LoRALinear

    with torch.device("meta"):
        model = config.instantiate(model_cfg)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, LoRALinear))


# --- reporting ------------------------------------------------------------------------------
def hardware(device: str) -> str:
    """One line naming the processor (CUDA device name, or CPU model and core count)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def today() -> str:
    return datetime.date.today().isoformat()


def write_report(out: Path, text: str, data: Dict[str, Any]) -> None:
    """A benchmark's report: ``text`` to ``out`` (.md) and ``data`` beside it as ``out``.json."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed, None becomes an en dash."""
    cells = [[("–" if c is None else str(c)) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def fmt(value: Optional[float], spec: str) -> Optional[str]:
    return None if value is None else format(value, spec)


def median_or_none(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def clean_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
