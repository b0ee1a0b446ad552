"""What the XGBLoRA recipes add to torchtune's LoRA recipes: wiring, shared by single-device and FSDP2.

Mixed in front of torchtune's recipe class (loaded by path, see torchtune_recipes.py). Each part
of the method lives in its own module; this class connects them to torchtune's recipe:

- ``__init__``: the config checked before anything loads (config/validation.py), the resume
  checkpoint verified (run/identity.py), ``output_dir`` claimed (run/output_dir.py); resume taken
  away from torchtune (its epoch-granular resume reloads the base plus one adapter, wrong once
  rounds are merged);
- ``_setup_model``: the loaded LoRA model handed to the :class:`~torchtune_xgb.method.boosting.Booster`;
- ``_setup_lr_scheduler``: per-round restarts (method/schedules.py);
- ``train``: the loop (run/loop.py);
- ``save_checkpoint``: the folded merged model and the run's adapter (export/), staged and renamed
  into place; ``summary``: run/summary.py.

Subclasses for other launch modes override the small hooks ``_scale_grads``, ``_reduce_loss``,
``_is_main_process``, ``_rank0_decides``, ``_any_rank_signal``, ``_all_ranks_done``, ``_wait_for_all_ranks``,
``_model_state_dict``, ``_merged_weights``, ``_optimizer_state_dict`` and ``_load_optimizer_state``.
"""
import os
from dataclasses import asdict, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

from torchtune_xgb.config.validation import validate_config, validate_resume
from torchtune_xgb.data.unlabeled import count_unlabeled
from torchtune_xgb.distributed.sharding import local
from torchtune_xgb.errors import ConfigError, RunError
from torchtune_xgb.eval.config import parse_eval_config
from torchtune_xgb.eval.periodic import PeriodicEval
from torchtune_xgb.export.adapter import adapter_only, collect_run_factors, write_adapter_dir
from torchtune_xgb.export.config import parse_export_config
from torchtune_xgb.export.fold import clean_name, fold_merged_weights
from torchtune_xgb.export.staged import epoch_dir, staged_export
from torchtune_xgb.method.boosting import Booster
from torchtune_xgb.method.loraxs import LoRAXSLinear
from torchtune_xgb.method.schedules import set_scheduler_step, with_round_restarts
from torchtune_xgb.quant.nf4 import fitting_nf4_blocks, is_nf4, keep_unquantizable_in_full_precision
from torchtune_xgb.run.checkpointing import (
    RESUME_DIR,
    latest_resume_dir,
    load_resume_segments,
    load_resume_state,
    resume_root,
    save_resume_state,
)
from torchtune_xgb.run.data_identity import check_loaded_data, loaded_data_identity
from torchtune_xgb.run.faults import fault_point
from torchtune_xgb.run.guard import GuardConfig, TrainingGuard
from torchtune_xgb.run.identity import run_identity
from torchtune_xgb.run.ledger_segments import write_segments
from torchtune_xgb.run.loop import BoostedTrainingLoop
from torchtune_xgb.run.output_dir import claim_output_dir
from torchtune_xgb.run.run_record import record_output
from torchtune_xgb.run.summary import SUMMARY_FILE, run_summary, write_summary

log = utils.get_logger("INFO")



class BoostedRecipeMixin(BoostedTrainingLoop):
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
        # held until the process ends; under torchrun rank 0 holds it for the job
        self._run_lock = claim_output_dir(cfg, take_lock=int(os.environ.get("RANK", "0")) == 0)
        self._last_resume_step: Optional[int] = None
        self._segment_entries: List[Dict[str, Any]] = []  # ledger segments written (rank 0: their entries)
        cfg.resume_from_checkpoint = False  # ours, see module docstring
        super().__init__(cfg)
        self._save_every = cfg.get("save_every_n_steps")
        self._eval_cfg = cfg.get("eval")
        self._eval = parse_eval_config(cfg)  # its keys with their defaults (eval/config.py)
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

    def _all_ranks_done(self, done: bool) -> bool:
        """Whether ``done`` holds on every rank (one process: as is)."""
        return done

    def _wait_for_all_ranks(self) -> None:
        """Return when every rank got here (one process: at once)."""

    def _scale_grads(self, num_tokens: torch.Tensor) -> None:
        # no label token in the step: it is skipped; its zero gradients stay zero (not 0·inf)
        training.scale_grads(self._model, 1 / num_tokens.clamp(min=1))

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
        dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
        self._run_identity.update(loaded_data_identity(dataset_cfg, self._dataloader.dataset, self._steps_per_epoch))
        if self._resume_boosted:  # before any step: the same data, the same steps per epoch
            check_loaded_data(self._resume_checkpoint.run, self._run_identity, self._resume_checkpoint.path)
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
        self._summary.setdefault("skipped_steps", 0)  # steps without a label token (run/loop.py)
        self._summary.setdefault("spike_skipped_steps", 0)  # transient loss spikes the guard skipped (run/guard.py)
        if self._is_main_process():  # samples that train nothing, said once before training
            unlabeled = count_unlabeled(self._dataloader.dataset, self._loss_fn.ignore_index,
                                        getattr(self._tokenizer, "max_seq_len", None))
            (log.warning if unlabeled.truncated or unlabeled.other else log.info)(unlabeled.line())
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
        return with_round_restarts(scheduler, self._boost, cfg_lr_scheduler)

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
            max_new_tokens=self._eval.max_new_tokens,
            batch_size=self._eval.batch_size,
            device=self._device,
            normalize=self._eval.normalize,
            all_ranks_done=self._all_ranks_done,  # under FSDP2 all ranks decode and must stop together
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
        segments = load_resume_segments(checkpoint)
        self._segment_entries = list(checkpoint.manifest.get("segments", []))
        self._booster.start(total_steps=self.total_epochs * self._steps_per_epoch, state=state["booster"],
                            segments=segments)
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
        # ledger segments sealed since the last save: written once, listed by every later checkpoint
        sealed = self._booster.segment_payloads(len(self._segment_entries))  # gathers too
        if self._is_main_process():
            record_output(self._output_dir, RESUME_DIR, "resume")  # before it is written: run_record.py
            entries = self._segment_entries + write_segments(resume_root(self._output_dir), sealed)
            # the checkpoint this one continues from is kept with it (checkpointing.py)
            path = save_resume_state(self._output_dir, self.global_step, state, run=self._run_identity,
                                     parent_step=self._last_resume_step, segments=entries)
            log.info(f"Saved resume checkpoint {path}")
        else:
            entries = self._segment_entries + [{}] * len(sealed)  # other ranks count them only
        self._segment_entries = entries
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
        # exists only once complete; its record keeps the summary entries for a resume
        record_output(self._output_dir, epoch_dir(self._output_dir, epoch).name, "export")
        exported: Dict[str, Any] = {}
        with staged_export(self._checkpointer, self._output_dir, epoch, self.global_step, resume_hint, exported) as staged:
            fault_point("export_write", self.global_step)
            if ckpt is None:
                staged.mkdir(parents=True)
            else:
                self._checkpointer.save_checkpoint(ckpt, epoch=epoch, intermediate_checkpoint=False, adapter_only=False)
            extra = {"merge_base": self._adapter.merge_base}
            written = write_adapter_dir(staged, updates, self._checkpointer, self._dtype, self._export, extra)
            exported.update(written, export="adapter" if ckpt is None else "merged model and adapter")
        self._summary.update(exported)

    # --- end of run -----------------------------------------------------------------------
    def _finish(self) -> None:
        if self._eval_examples is not None:
            self._summary["exact_match_after"] = self._exact_match()
            self._periodic_eval.log_final_exact_match(self.global_step, self._summary["exact_match_after"])
            log.info(
                f"exact match: before {self._summary.get('exact_match_before', float('nan')):.3f}, "
                f"after {self._summary['exact_match_after']:.3f}"
            )
        fault_point("before_summary", self.global_step)
        if self._is_main_process():
            record_output(self._output_dir, SUMMARY_FILE, "summary")
            path = write_summary(self._output_dir, self.summary())
            log.info(f"Wrote {path}")

    def summary(self) -> Dict[str, Any]:
        """The run summary written to ``output_dir/xgb_summary.json`` (keys are stable)."""
        return run_summary(self._booster, self._adapter, steps=self.global_step, wall_seconds=self._wall_seconds(),
                           final_loss=self._last_loss, lora_rank=self._lora_rank, extra=self._summary)
