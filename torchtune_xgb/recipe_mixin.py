"""What the XGBLoRA recipes add to torchtune's LoRA recipes; shared by single-device and FSDP2.

Mixed in front of torchtune's recipe class (loaded by path, see torchtune_recipes.py):

- ``__init__``: validates the config before anything loads (one-line errors), verifies the
  resume checkpoint and that it belongs to the same run (run_identity.py), claims ``output_dir``
  (run_dir.py); takes resume away from torchtune (its epoch-granular resume reloads the base plus
  one adapter, wrong once rounds are merged);
- ``_setup_model``: after torchtune built the LoRA model and loaded the base, hands it to the
  :class:`~torchtune_xgb.method.boosting.Booster` (re-classes adapters, snapshots W0);
- ``_setup_lr_scheduler``: wraps the configured schedule with per-round restarts;
- ``train``: torchtune's loop structure (token-normalised gradient accumulation, clipping,
  profiler, metric logger) plus the divergence guard before each step is applied (guard.py),
  the round hook, periodic evaluation, a progress bar that shows the round, mid-run checkpoints
  every ``save_every_n_steps`` and exact mid-epoch resume; a resume at an epoch's end writes an
  export that never arrived; SIGTERM or Ctrl-C during the steps finishes the step, writes a
  resume checkpoint and stops (stop_signal.py);
- ``save_checkpoint``: exports the folded merged model in the checkpointer's format and the
  run's adapter, through a staging directory renamed into place (staged_export.py).

Subclasses for other launch modes override the small hooks ``_scale_grads``, ``_reduce_loss``,
``_is_main_process``, ``_rank0_decides``, ``_any_rank_signal``, ``_wait_for_all_ranks``,
``_model_state_dict``, ``_merged_weights``, ``_optimizer_state_dict`` and ``_load_optimizer_state``.
"""
import json
import os
import time
from contextlib import closing as _closing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params
from tqdm import tqdm

from torchtune_xgb.export.adapter import adapter_only, collect_run_factors, parse_export_config, write_adapter_dir
from torchtune_xgb.method.boosting import Booster, RoundReport
from torchtune_xgb.run.checkpointing import latest_resume_dir, load_resume_state, save_resume_state
from torchtune_xgb.errors import ConfigError, RunError, StoppedBySignal
from torchtune_xgb.export.fold import clean_name, fold_merged_weights
from torchtune_xgb.run.faults import KILL_AT_STEP_ENV, fault_point, fault_value  # noqa: F401 (KILL_AT_STEP_ENV: tests)
from torchtune_xgb.run.guard import GuardConfig, TrainingGuard
from torchtune_xgb.method.loraxs import LoRAXSLinear
from torchtune_xgb.quant.nf4 import fitting_nf4_blocks, is_nf4, keep_unquantizable_in_full_precision
from torchtune_xgb.eval.periodic import PeriodicEval
from torchtune_xgb.run.output_dir import SUMMARY_FILE, claim_output_dir
from torchtune_xgb.run.identity import run_identity
from torchtune_xgb.method.schedules import apply_round_restarts, set_scheduler_step
from torchtune_xgb.distributed.sharding import local
from torchtune_xgb.export.staged import export_complete, staged_export
from torchtune_xgb.run.stop_signal import FORCE_AFTER_S, StopOnSignal, signal_name
from torchtune_xgb.config.validation import validate_config, validate_resume

log = utils.get_logger("INFO")



class BoostedRecipeMixin:
    """Boosting on top of a torchtune LoRA recipe class (put this first in the bases)."""

    @property
    def method(self) -> str:
        return self._adapter.method

    def __init__(self, cfg: DictConfig) -> None:
        # everything below runs before any weights load: bad input ends here with one line
        self._boost, self._adapter = validate_config(cfg)
        guard_block = cfg.get("guard")
        self._guard = TrainingGuard(GuardConfig.from_mapping(
            OmegaConf.to_container(guard_block, resolve=True) if guard_block is not None else None
        ))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._run_identity = run_identity(cfg, world_size)  # recorded in every resume checkpoint
        self._resume_checkpoint = validate_resume(cfg, world_size, self._run_identity)  # verified, same run
        self._single_round = cfg.get("boost") is None  # no boosting: one round, the whole run
        if self._single_round:
            self._boost = replace(self._boost, lr_restart="none")
        self._resume_boosted = bool(cfg.get("resume_from_checkpoint", False))
        if self._resume_boosted and cfg.get("overwrite_output_dir", False):
            raise ConfigError("overwrite_output_dir: cannot be True together with resume_from_checkpoint=True")
        # held until the process ends; under torchrun rank 0 holds it for the job
        self._run_lock = claim_output_dir(
            cfg.output_dir,
            resume=self._resume_boosted,
            overwrite=bool(cfg.get("overwrite_output_dir", False)),
            take_lock=int(os.environ.get("RANK", "0")) == 0,
            metrics_file=_disk_logger_file(cfg),
        )
        self._last_resume_step: Optional[int] = None
        cfg.resume_from_checkpoint = False  # ours, see module docstring
        super().__init__(cfg)
        self._save_every = cfg.get("save_every_n_steps")
        self._eval_cfg = cfg.get("eval")
        self._export = parse_export_config(cfg)  # the export: block (adapter_export.py)
        self._adapter_only = adapter_only(cfg)  # torchtune's save_adapter_weights_only
        self._summary: Dict[str, Any] = {}
        self._wall_before_resume = 0.0
        self._last_loss: Optional[float] = None

    # --- hooks that launch modes override -------------------------------------------------
    def _is_main_process(self) -> bool:
        return True

    def _rank0_decides(self, value: bool) -> bool:
        """``value`` as rank 0 sees it, on every rank (one process: as is)."""
        return value

    def _any_rank_signal(self, signum: int) -> int:
        """The largest stop-signal number any rank received (0: none; one process: as is)."""
        return signum

    def _wait_for_all_ranks(self) -> None:
        """Return when every rank got here (one process: at once)."""

    def _scale_grads(self, num_tokens: torch.Tensor) -> None:
        training.scale_grads(self._model, 1 / num_tokens)

    def _reduce_loss(self, running_loss: torch.Tensor) -> torch.Tensor:
        """The step's token-weighted loss sum over all ranks (one process: as is)."""
        return running_loss

    def _optimizer_state_dict(self) -> Dict[str, Any]:
        return self._optimizer.state_dict()

    def _load_optimizer_state(self, state: Dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state)

    def _model_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self._model.state_dict().items()}

    def _merged_weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(module name, merged weight in the checkpoint dtype), streamed one module at a time."""
        return self._booster.export_weights(self._dtype)

    # --- setup ----------------------------------------------------------------------------
    def setup(self, cfg: DictConfig) -> None:
        super().setup(cfg)
        if self._steps_per_epoch < 1:
            raise ConfigError("dataset: fewer batches than batch_size × gradient_accumulation_steps")
        self._booster.attach(self._optimizer)
        self._eval_examples = None
        if self._eval_cfg is not None:
            self._eval_examples = config.instantiate(self._eval_cfg.examples)
        total_steps = self.total_epochs * self._steps_per_epoch
        if self._single_round:
            self._booster.config = replace(self._boost, steps_per_round=total_steps)
        if self._resume_boosted:
            self._load_resume()
        else:
            self._booster.start(total_steps=total_steps)
        if not self._resume_boosted and self._eval_examples is not None:
            self._summary["exact_match_before"] = self._exact_match()
            log.info(f"exact match before training: {self._summary['exact_match_before']:.3f}")
        self._log_boost_setup()
        self._periodic_eval = PeriodicEval.from_config(self, cfg)  # dataset_val, eval.every_n_steps

    def _setup_model(self, *args, **kwargs):
        with fitting_nf4_blocks():  # NF4 shapes torchao's default blocks cannot take (nf4.py)
            model = super()._setup_model(*args, **kwargs)
        keep_unquantizable_in_full_precision(model)
        originals = None
        # LoRA modules, or LoRA-XS ones where the distributed recipe converted them before sharding
        adapted = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAXSLinear))}
        needs_originals = self.method == "loraxs" or self._adapter.merge_base == "original"
        if needs_originals and any(is_nf4(local(m.weight)) for m in adapted.values()):
            # the checkpoint's full-precision weights: LoRA-XS decomposes them, merge_base=original
            # uses them; otherwise nothing keeps them (they would stay in memory for the whole run)
            state = kwargs.get("base_model_state_dict") or {}
            keys = {n: f"{clean_name(n)}.weight" for n in adapted}  # module names may carry AC's wrapper
            originals = {n: state[k].cpu() for n, k in keys.items() if k in state}
        self._booster = Booster(model, self._boost, self._adapter, originals=originals)
        # LoRA-XS replaced the LoRA modules: the trainables are now the r×r cores
        self.adapter_params = get_adapter_params(model)
        set_trainable_params(model, self.adapter_params)
        return model

    def _setup_lr_scheduler(self, cfg_lr_scheduler: DictConfig, num_training_steps: int, last_epoch: int):
        scheduler = super()._setup_lr_scheduler(cfg_lr_scheduler, num_training_steps, last_epoch)
        per_round = None
        if self._boost.lr_restart == "per_round":
            # only its lambdas are used; a dummy optimizer keeps the real LRs untouched
            dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            per_round = config.instantiate(
                cfg_lr_scheduler, dummy, num_training_steps=self._boost.steps_per_round, last_epoch=-1
            )
        return apply_round_restarts(scheduler, self._boost, per_round)

    def _log_boost_setup(self) -> None:
        b = self._booster
        log.info(
            f"{self.method}: {len(b.modules)} adapted modules in {b.num_blocks} blocks, "
            f"{b.blocks_per_round} blocks/round, κ={b.config.steps_per_round}, "
            f"{b.trainable_params()} trainable params/step, rank {self._lora_rank}"
        )

    # --- evaluation -----------------------------------------------------------------------
    def _exact_match(self) -> float:
        from torchtune_xgb.eval.exact_match import exact_match

        return exact_match(
            self._model,
            self._tokenizer,
            self._eval_examples,
            max_new_tokens=self._eval_cfg.get("max_new_tokens", 8),
            batch_size=self._eval_cfg.get("batch_size", 16),
            device=self._device,
            normalize=self._eval_cfg.get("normalize", "strip"),
        )

    # --- resume ---------------------------------------------------------------------------
    def _resume_state(self) -> Dict[str, Any]:
        return {
            "booster": self._booster.state_dict(),
            "optimizer": self._optimizer_state_dict(),
            "global_step": self.global_step,
            "seed": self.seed,
            "boost": asdict(self._booster.config),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "summary": dict(self._summary),
            "wall_seconds": self._wall_seconds(),
            "last_loss": self._last_loss,
            "guard_recent": list(self._guard.recent),
        }

    def _load_resume(self) -> None:
        checkpoint = self._resume_checkpoint
        if checkpoint.skipped:
            log.warning(
                f"resume: skipped {'; '.join(checkpoint.skipped)}; resuming from the previous intact checkpoint {checkpoint.path}"
            )
        state = load_resume_state(checkpoint)
        self._booster.start(total_steps=self.total_epochs * self._steps_per_epoch, state=state["booster"])
        self._load_optimizer_state(state["optimizer"])
        self.global_step = int(state["global_step"])
        self.epochs_run = self.global_step // self._steps_per_epoch
        set_scheduler_step(self._lr_scheduler, self.global_step)
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._summary = dict(state["summary"])
        self._wall_before_resume = float(state["wall_seconds"])
        self._last_loss = state.get("last_loss")
        self._guard.recent.extend(state.get("guard_recent", []))
        self._last_resume_step = self.global_step
        log.info(f"Resumed at step {self.global_step} (round {self._booster.round}) from {checkpoint.path}.")

    def _save_resume(self) -> None:
        state = self._resume_state()  # gathers under FSDP2: every rank takes part
        if self._is_main_process():
            path = save_resume_state(self._output_dir, self.global_step, state, run=self._run_identity)
            log.info(f"Saved resume checkpoint {path}")
        self._last_resume_step = self.global_step

    def _last_good_checkpoint(self) -> str:
        path = latest_resume_dir(self._output_dir)
        return str(path) if path is not None else "none was written yet (save_every_n_steps)"

    # --- export ---------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int) -> None:
        """Write the merged full model to ``output_dir/epoch_{epoch}`` via the checkpointer, and the
        run's update as a PEFT LoRA adapter to ``epoch_{epoch}/adapter`` (adapter_export.py); with
        ``save_adapter_weights_only`` the adapter only."""
        if self._adapter_only:  # the same on every rank: no rank gathers the model
            model_sd, merged = None, iter(())
        else:
            model_sd = self._model_state_dict()
            merged = self._merged_weights()  # an iterator: under FSDP2 every rank must drain it
        updates = collect_run_factors(self._booster)  # gathers under FSDP2: every rank takes part
        if not self._is_main_process():
            for _ in merged:
                pass
            return
        if self._adapter_only and not updates:  # an export of nothing would look like a finished run
            raise RunError("save_adapter_weights_only: the run has no update to write as an adapter")
        ckpt = None if self._adapter_only else {training.MODEL_KEY: fold_merged_weights(model_sd, merged, dtype=self._dtype)}
        resume_hint = (
            f"the resume checkpoint {latest_resume_dir(self._output_dir)} is intact: free space and run again with "
            "resume_from_checkpoint=True to write the export"
        )
        # written to a staging directory and renamed into place: epoch_N/ (with its adapter/)
        # exists only once complete
        with staged_export(self._checkpointer, self._output_dir, epoch, self.global_step, resume_hint) as staged:
            fault_point("export_write", self.global_step)
            if ckpt is None:
                staged.mkdir(parents=True)
            else:
                self._checkpointer.save_checkpoint(ckpt, epoch=epoch, intermediate_checkpoint=False, adapter_only=False)
            extra = {"merge_base": self._adapter.merge_base}
            written = write_adapter_dir(staged, updates, self._checkpointer, self._dtype, self._export, extra)
            self._summary.update(written, export="adapter" if ckpt is None else "merged model and adapter")

    # --- training loop --------------------------------------------------------------------
    def _wall_seconds(self) -> float:
        return self._wall_before_resume + (time.perf_counter() - self._train_start)

    def _train_step(self, batches) -> Dict[str, Any]:
        running_loss, num_tokens = 0.0, 0
        for _ in range(self._gradient_accumulation_steps):
            batch = next(batches)
            utils.batch_to_device(batch, self._device)
            current_num_tokens = (batch["labels"] != self._loss_fn.ignore_index).sum()
            num_tokens += current_num_tokens
            # loss is a token mean: weight by tokens so accumulation normalises over all of them
            current_loss = self._loss_step(batch) * current_num_tokens
            running_loss += current_loss
            current_loss.backward()
        fault_point("mid_step", self.global_step + 1)
        self._scale_grads(num_tokens)
        if self._clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), max_norm=float(self._clip_grad_norm))
        else:  # still needed: the guard stops on a non-finite gradient before it is applied
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._model.parameters() if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        lr = self._optimizer.param_groups[0]["lr"]
        round_index = self._booster.round
        trainable = self._booster.trainable_params()
        loss = self._reduce_loss(running_loss.detach()).item() / num_tokens.item()  # same on every rank
        loss = loss * fault_value("loss", self.global_step + 1)  # fault injection (tests); 1.0 otherwise
        self._guard.check(self.global_step + 1, round_index, loss, grad_norm, self._last_good_checkpoint)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._guard.config.max_update_ratio is not None:  # before the round can be merged or saved
            ratio, module = self._booster.live_update_ratio()
            self._guard.check_update(self.global_step + 1, round_index, ratio, module, self._last_good_checkpoint)
        report = self._booster.after_optimizer_step()
        self._lr_scheduler.step()
        self.global_step += 1
        return {
            "loss": loss,
            "lr": lr,
            "num_tokens": int(num_tokens),
            "round": round_index,
            "trainable_params": trainable,
            "grad_norm": grad_norm,
            "report": report,
        }

    def _log_round(self, report: RoundReport) -> None:
        self._metric_logger.log_dict(
            {
                "round": report.round,
                "merge_seconds": report.merge_seconds,
                "reset_seconds": report.reset_seconds,
                "kept_fraction": report.kept_fraction,
                "trainable_params": report.trainable_params,
                "merged_modules": report.merged_modules,
            },
            step=self.global_step,
        )

    def train(self) -> None:
        self._train_start = time.perf_counter()
        if self._finish_interrupted_export():
            if (Path(self._output_dir) / SUMMARY_FILE).is_file():
                log.info(f"Nothing left to do: the run in {self._output_dir} is complete")
            else:
                self._finish()
            return
        total_steps = self.total_epochs * self._steps_per_epoch
        pbar = tqdm(total=total_steps, initial=self.global_step, disable=not self._is_main_process())
        sampler = self._dataloader.sampler
        samples_per_step = self._gradient_accumulation_steps * self._dataloader.batch_size
        with self._profiler as prof, _closing(pbar):  # an error line then starts on a line of its own
            for epoch in range(self.epochs_run, self.total_epochs):
                done = self.global_step - epoch * self._steps_per_epoch
                sampler.set_epoch(epoch)
                if done:  # mid-epoch resume: continue after the samples already trained on
                    sampler.load_state_dict({"yielded": done * samples_per_step})
                batches = iter(self._dataloader)
                # SIGTERM / Ctrl-C during the steps: finish the step, save, stop (stop_signal.py)
                with StopOnSignal(self._log_stop_request) as stop:
                    self._train_epoch_steps(batches, done, total_steps, pbar, prof, stop)
                self.epochs_run += 1
                self._end_epoch(epoch)
        self._finish()

    def _train_epoch_steps(self, batches, done: int, total_steps: int, pbar, prof, stop: StopOnSignal) -> None:
        """The optimizer steps ``done`` … end of the epoch, each logged, evaluated and saved as
        configured; after each, a requested stop (any rank) saves and ends the run."""
        t0 = time.perf_counter()
        for _ in range(done, self._steps_per_epoch):
            out = self._train_step(batches)
            self._last_loss = out["loss"]
            pbar.update(1)
            pbar.set_description(f"round {out['round']}|step {self.global_step}|loss {out['loss']:.4f}")
            if self.global_step % self._log_every_n_steps == 0:
                seconds = time.perf_counter() - t0
                log_dict = {
                    "loss": out["loss"],
                    "lr": out["lr"],
                    "tokens_per_second_per_gpu": out["num_tokens"] / seconds,
                    "round": out["round"],
                    "trainable_params": out["trainable_params"],
                }
                if self._clip_grad_norm is not None:
                    log_dict["grad_norm"] = out["grad_norm"]
                if self._device.type == "cuda" and self._log_peak_memory_stats:
                    log_dict.update(training.get_memory_stats(device=self._device))
                self._metric_logger.log_dict(log_dict, step=self.global_step)
            if out["report"] is not None:
                self._log_round(out["report"])
            self._periodic_eval.after_step(self.global_step, total_steps)  # val_loss, exact_match
            if self._save_every and self.global_step % self._save_every == 0:
                self._save_resume()
            fault_point("after_step", self.global_step)
            signum = self._any_rank_signal(stop.requested or 0)
            if signum:
                self._stop_for_signal(signum)
            prof.step()
            t0 = time.perf_counter()

    def _log_stop_request(self, signum: int) -> None:
        """Said at once (from the signal handler): a raw write on a line of its own, no lock that
        the interrupted code (logging, the progress bar) could be holding."""
        if self._is_main_process():
            os.write(2, (f"\n{signal_name(signum)}: stopping after step {self.global_step + 1} with a resume checkpoint "
                         f"(the same signal again, after {FORCE_AFTER_S:g} s, stops at once)\n").encode())

    def _stop_for_signal(self, signum: int) -> None:
        """Write a resume checkpoint of this step (unless the step just wrote one), then end the run."""
        if self._last_resume_step != self.global_step:
            self._save_resume()
        # no rank leaves before rank 0 has written the checkpoint: torchrun stops the other
        # workers as soon as one exits non-zero
        self._wait_for_all_ranks()
        total = self.total_epochs * self._steps_per_epoch
        raise StoppedBySignal(
            f"stopped by {signal_name(signum)} after step {self.global_step} of {total} (round {self._booster.round}); "
            f"{self._last_good_checkpoint()} holds everything trained so far: resume_from_checkpoint=True continues the run",
            signum,
        )

    def _finish_interrupted_export(self) -> bool:
        """After a resume exactly at an epoch's end whose export never arrived (killed, or the disk
        was full), write it now: the state at that step is the one that export needs. Returns True
        when the run had nothing left but that (or nothing at all)."""
        done = self.global_step - self.epochs_run * self._steps_per_epoch
        if self.epochs_run == 0 or done != 0 or not self._resume_boosted:
            return False
        last = self.epochs_run - 1
        if not self._rank0_decides(export_complete(self._output_dir, last)):
            if self._is_main_process():
                log.info(f"Resumed at the end of epoch {last}: writing its missing export")
            self._end_epoch(last)
        return self.epochs_run == self.total_epochs

    def _end_epoch(self, epoch: int) -> None:
        """Export epoch ``epoch``; after the last one, first make sure a resume checkpoint of the
        final step exists (so a failed export never loses the run), then fold a partial round."""
        if epoch == self.total_epochs - 1:
            if self._last_resume_step != self.global_step:
                self._save_resume()
            final = self._booster.finish()
            if final is not None:
                self._log_round(final)
        self.save_checkpoint(epoch=epoch)

    # --- end of run -----------------------------------------------------------------------
    def _finish(self) -> None:
        if self._eval_examples is not None:
            self._summary["exact_match_after"] = self._exact_match()
            self._periodic_eval.log_final_exact_match(self.global_step, self._summary["exact_match_after"])
            log.info(
                f"exact match: before {self._summary.get('exact_match_before', float('nan')):.3f}, "
                f"after {self._summary['exact_match_after']:.3f}"
            )
        if self._is_main_process():
            summary = self.summary()
            path = Path(self._output_dir) / SUMMARY_FILE
            tmp = path.with_name(f".{SUMMARY_FILE}.tmp")
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, path)  # a reader never sees half a summary
            log.info(f"Wrote {path}")

    def summary(self) -> Dict[str, Any]:
        """The run summary written to ``output_dir/xgb_summary.json`` (keys are stable)."""
        reports = self._booster.reports
        kept = [r.kept_fraction for r in reports if r.merged_modules]
        summary = {
            "method": self.method,
            "rounds": len(reports),
            "steps": self.global_step,
            "trainable_params": max((r.trainable_params for r in reports), default=self._booster.trainable_params()),
            "distinct_params_touched": self._booster.distinct_params_touched(),
            "wall_seconds": self._wall_seconds(),
            "merge_seconds": sum(r.merge_seconds + r.reset_seconds for r in reports),
            "min_kept_fraction": min(kept) if kept else None,
            "merged_state_bytes": self._booster.merged.nbytes(),
            "final_loss": self._last_loss,
            "lora_rank": self._lora_rank,
            "svd_seconds": self._booster.svd_seconds,
            "boost": asdict(self._booster.config),
            "adapter": asdict(self._adapter),
            "round_reports": [asdict(r) for r in reports],
        }
        summary.update(self._summary)
        return summary


def _disk_logger_file(cfg: DictConfig) -> Optional[str]:
    """The file torchtune's DiskLogger appends to (None for other loggers or a generated name)."""
    log_dir, filename = OmegaConf.select(cfg, "metric_logger.log_dir"), OmegaConf.select(cfg, "metric_logger.filename")
    if isinstance(log_dir, str) and isinstance(filename, str):
        return str(Path(log_dir) / filename)
    return None
