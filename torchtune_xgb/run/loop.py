"""The training loop of the boosted recipes: torchtune's loop structure plus the rounds.

Token-normalised gradient accumulation, clipping, profiler and metric logger as in torchtune's
LoRA recipe, plus: the divergence guard before each step is applied (run/guard.py; what it needs
is read back in one host read per step, as torchtune reads its loss), steps without any label
token skipped and counted (``skipped_steps``), the round hook after each optimizer step
(method/boosting.py), periodic evaluation, a progress bar that
shows the round, mid-run checkpoints every ``save_every_n_steps`` and exact mid-epoch resume; a
resume at an epoch's end writes an export that never arrived; SIGTERM or Ctrl-C during the steps
finishes the step, writes a resume checkpoint and stops (run/stop_signal.py).

A mixin of :class:`~torchtune_xgb.recipe_mixin.BoostedRecipeMixin`: it uses the recipe's
attributes (``_model``, ``_optimizer``, ``_booster``, ``_guard``…) and its launch-mode hooks.
"""

import os
import time
from contextlib import closing as _closing
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import torch
from torchtune import training, utils
from tqdm import tqdm

from torchtune_xgb.errors import StoppedBySignal
from torchtune_xgb.export.staged import export_complete, exported_summary
from torchtune_xgb.method.boosting import RoundReport
from torchtune_xgb.run.batch_layout import rank_position
from torchtune_xgb.run.faults import fault_point, fault_value
from torchtune_xgb.run.stop_signal import FORCE_AFTER_S, StopOnSignal, signal_name
from torchtune_xgb.run.summary import SUMMARY_FILE

log = utils.get_logger("INFO")


class _PendingUpdate(NamedTuple):
    """Booster.live_update_ratio of step ``step`` (of round ``round``), still on the device."""

    step: int
    round: int
    ratio: torch.Tensor  # [largest ratio, index of its module in ``modules``]
    modules: List[str]


def _read_together(*tensors: torch.Tensor) -> List[float]:
    """The values of ``tensors`` (scalars or 1-d, on one device) as Python floats, read back to
    the host in one transfer (one synchronisation on a GPU) instead of one per value."""
    device = tensors[0].device
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]).tolist()


class BoostedTrainingLoop:
    """``train`` and its steps, for a recipe that mixes in :class:`BoostedRecipeMixin`."""

    def _wall_seconds(self) -> float:
        return self._wall_before_resume + (time.perf_counter() - self._train_start)

    def _train_step(self, batches, check_update_now: bool = False) -> Dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        The host reads the device once per step: the step's loss sum, token count and gradient
        norm, together with the previous step's update ratio (run/guard.py says why that check
        may lag a step), stacked and read in one go before the optimizer applies the step. A step
        that will be merged, saved or exported (``check_update_now``: the caller's save or epoch
        end; a round's last step, here) reads its own update ratio at once (a second read).

        A micro-batch without label tokens (every label masked, e.g. a prompt that fills
        ``max_seq_len``) adds nothing to the loss or the gradient; a step without any applies no
        update (the optimizer is not stepped) but counts as a step for the schedule and the
        rounds, and is counted in ``skipped_steps`` (summary and metric log). So does a step whose
        loss spiked where nothing of it is kept (run/guard.py; ``spike_skipped_steps``)."""
        running_loss, num_tokens = 0.0, 0
        for _ in range(self._gradient_accumulation_steps):
            batch = next(batches)
            utils.batch_to_device(batch, self._device)
            current_num_tokens = (batch["labels"] != self._loss_fn.ignore_index).sum()
            num_tokens += current_num_tokens
            # loss is a token mean: weight by tokens so accumulation normalises over all of them;
            # without tokens the mean is 0/0 = NaN (its gradient is 0: every position is ignored)
            current_loss = self._loss_step(batch) * current_num_tokens
            current_loss = torch.where(current_num_tokens > 0, current_loss, 0.0)
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
        step, round_index = self.global_step + 1, self._booster.round
        lr = self._optimizer.param_groups[0]["lr"]
        trainable = self._booster.trainable_params()
        pending, self._pending_update = self._pending_update, None
        # the one host read of the step; every value is reduced over ranks: the same on each
        loss_sum, tokens, grad_norm, *ratio = _read_together(
            self._reduce_loss(running_loss.detach()), num_tokens, grad_norm, *([pending.ratio] if pending else []))
        if pending:  # the previous step's update, before this step is applied
            self._check_update(pending, ratio)
        skipped, spike = tokens == 0, None
        loss = None if skipped else loss_sum / tokens * fault_value("loss", step)  # fault injection (tests); 1.0 otherwise
        # a round's last step is merged; the caller saves or exports after check_update_now
        kept = check_update_now or (self._booster.step + 1) % self._booster.config.steps_per_round == 0
        if skipped:
            self._summary["skipped_steps"] = self._summary.get("skipped_steps", 0) + 1
        else:
            # a transient spike is skipped, not applied (run/guard.py); only where nothing is kept
            spike = self._guard.check(step, round_index, loss, grad_norm, self._last_good_checkpoint, may_skip=not kept)
            if spike:
                self._summary["spike_skipped_steps"] = self._summary.get("spike_skipped_steps", 0) + 1
            else:
                self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if not (skipped or spike) and self._guard.config.max_update_ratio is not None:
            # left on the device, read with the next step's loss
            self._pending_update = _PendingUpdate(step, round_index, *self._booster.live_update_ratio())
            if kept:
                self._check_pending_update()  # before the round can be merged, saved or exported
        report = self._booster.after_optimizer_step()
        self._lr_scheduler.step()
        self.global_step += 1
        return {
            "loss": loss,
            "lr": lr,
            "num_tokens": int(tokens),
            "round": round_index,
            "trainable_params": trainable,
            "grad_norm": grad_norm,
            "skipped": skipped,
            "spike": spike,  # a skipped spike, in words (None: none)
            "report": report,
        }

    _pending_update: Optional["_PendingUpdate"] = None  # a step's update ratio, not read yet

    def _check_pending_update(self) -> None:
        """Read and check the update ratio still pending (one host read), if any."""
        pending, self._pending_update = self._pending_update, None
        if pending:
            self._check_update(pending, _read_together(pending.ratio))

    def _check_update(self, pending: "_PendingUpdate", values: List[float]) -> None:
        """Stop if ``pending``'s update is out of bounds; ``values``: its ratio tensor as read."""
        ratio, index = values
        module = pending.modules[int(index)] if pending.modules else None
        self._guard.check_update(pending.step, pending.round, ratio, module, self._last_good_checkpoint)

    def _log_skipped_step(self) -> None:
        """A step without label tokens: its running count in the metric log (at every such step)
        and, the first time, one line saying why."""
        count = self._summary["skipped_steps"]
        self._metric_logger.log_dict({"skipped_steps": count}, step=self.global_step)
        if count == 1 and self._is_main_process():
            log.warning(
                f"step {self.global_step}: no micro-batch has a label token (every label masked, e.g. prompts that fill "
                "tokenizer.max_seq_len): the optimizer step was skipped; such steps are counted as skipped_steps"
            )

    def _log_spike_skipped(self, spike: str) -> None:
        """A spiking step the guard skipped (``spike``: what the guard said): the running count in the
        metric log and a warning line."""
        count = self._summary["spike_skipped_steps"]
        self._metric_logger.log_dict({"spike_skipped_steps": count}, step=self.global_step)
        if self._is_main_process():
            log.warning(
                f"step {self.global_step} (round {self._booster.round}): {spike}; "
                f"{count} skipped so far, counted as spike_skipped_steps"
            )

    def _log_round(self, report: RoundReport) -> None:
        self._metric_logger.log_dict(report.metrics(), step=self.global_step)

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
        sampler = self._dataloader.sampler  # a DistributedSampler, also on one process
        global_batch = self._gradient_accumulation_steps * self._dataloader.batch_size * sampler.num_replicas
        with self._profiler as prof, _closing(pbar):  # an error line then starts on a line of its own
            for epoch in range(self.epochs_run, self.total_epochs):
                done = self.global_step - epoch * self._steps_per_epoch
                sampler.set_epoch(epoch)
                if done:  # mid-epoch resume: every rank continues at the next global sample (batch_layout.py)
                    sampler.load_state_dict({"yielded": rank_position(done, global_batch, sampler.num_replicas)})
                batches = iter(self._dataloader)
                # SIGTERM / Ctrl-C during the steps: finish the step, save, stop (stop_signal.py);
                # the step a stop request names (the loop moves it on after each step's stop check)
                self._step_in_progress = self.global_step + 1
                with StopOnSignal(self._log_stop_request) as stop:
                    self._train_epoch_steps(batches, done, total_steps, pbar, prof, stop)
                self.epochs_run += 1
                self._end_epoch(epoch)
        self._finish()

    def _train_epoch_steps(self, batches, done: int, total_steps: int, pbar, prof, stop: StopOnSignal) -> None:
        """The optimizer steps ``done`` … end of the epoch, each logged, evaluated and saved as
        configured; after each, a requested stop (any rank) saves and ends the run."""
        t0 = time.perf_counter()
        for index in range(done, self._steps_per_epoch):
            saved = bool(self._save_every) and (self.global_step + 1) % self._save_every == 0
            out = self._train_step(batches, check_update_now=saved or index == self._steps_per_epoch - 1)
            pbar.update(1)
            if out["skipped"]:
                self._log_skipped_step()
            elif out["spike"]:
                self._log_spike_skipped(out["spike"])
            else:
                self._last_loss = out["loss"]
            shown = "no label tokens: skipped" if out["skipped"] else f"loss {out['loss']:.4f}"
            shown += " (spike: skipped)" if out["spike"] else ""
            pbar.set_description(f"round {out['round']}|step {self.global_step}|{shown}")
            if self.global_step % self._log_every_n_steps == 0:
                seconds = time.perf_counter() - t0
                log_dict = {
                    "lr": out["lr"],
                    "tokens_per_second_per_gpu": out["num_tokens"] / seconds,
                    "round": out["round"],
                    "trainable_params": out["trainable_params"],
                }
                if not out["skipped"]:
                    log_dict["loss"] = out["loss"]
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
                # never a checkpoint of the weights a spike was just measured on (run/guard.py)
                self._guard.refuse_save_in_spike(self.global_step, self._booster.round,
                                                 f"stopped by {signal_name(signum)}", self._last_good_checkpoint)
                self._stop_for_signal(signum)
            self._step_in_progress = self.global_step + 1  # a signal from now on stops after the next step
            prof.step()
            t0 = time.perf_counter()

    def _log_stop_request(self, signum: int) -> None:
        """Said at once (from the signal handler): a raw write on a line of its own, no lock that
        the interrupted code (logging, the progress bar) could be holding."""
        if self._is_main_process():
            os.write(2, (f"\n{signal_name(signum)}: stopping after step {self._step_in_progress} with a resume checkpoint, unless that "
                         "step's loss spiked (then nothing is saved and the last good checkpoint stays the resume point); "
                         f"the same signal again, after {FORCE_AFTER_S:g} s, stops at once\n").encode())

    def _stop_for_signal(self, signum: int) -> None:
        """Write a resume checkpoint of this step (unless the step just wrote one), then end the run."""
        self._check_pending_update()  # nothing out of bounds is saved
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
        was full), write it now: the state at that step is the one that export needs. After the
        final export did arrive (killed before the summary), bring the run to the state that export
        left it in: the partial last round folded (the checkpoint of the final step is saved
        before that, see ``_end_epoch``) and the export's summary entries from its record.
        Returns True when the run had nothing left but that (or nothing at all)."""
        done = self.global_step - self.epochs_run * self._steps_per_epoch
        if self.epochs_run == 0 or done != 0 or not self._resume_boosted:
            return False
        last = self.epochs_run - 1
        if not self._rank0_decides(export_complete(self._output_dir, last)):
            if self._is_main_process():
                log.info(f"Resumed at the end of epoch {last}: writing its missing export")
            self._end_epoch(last)
        elif self.epochs_run == self.total_epochs:
            self._booster.finish()  # its round report was logged before the kill
            if self._is_main_process():
                self._summary.update(exported_summary(self._output_dir, last))
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

