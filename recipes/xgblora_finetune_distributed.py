"""``tune run --nproc_per_node N xgblora_finetune --config …``: XGBLoRA with FSDP2.

torchtune launches an unknown recipe name with ``torchrun -m NAME`` when ``--nproc_per_node`` is
given; ``xgblora_finetune`` then dispatches here (``xgblora_finetune_distributed`` works as a
name too). Multi-node: plain torchrun rendezvous, see docs/guides/distributed.md.

The class is torchtune's ``LoRAFinetuneRecipeDistributed`` (loaded by path) with the same
:class:`~torchtune_xgb.recipe_mixin.BoostedRecipeMixin` as the single-device recipe; this file
only fills the launch-mode hooks: rank-0 I/O, cross-rank loss/token reduction, gathered state
for resume and export. Merges are shard-local (see torchtune_xgb/distributed/sharding.py).

On machines without CUDA the process group uses gloo, and torchtune's CUDA-only memory
statistics are skipped, so the recipe runs (and is tested) on CPU.

NF4 bases (``model.quantize_base: True``) are sharded as row slices of the single-device
quantization (torchtune_xgb/quant/nf4_sharding.py); their merged rounds stay beside the NF4 weight with
the ledger rows sharded like it (adapters.merged_path gathers them in the forward).
"""

import contextlib
import json
import os
import sys
import traceback
from typing import Any, Dict, Iterator, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torchtune import config, training, utils

from torchtune_xgb.config.names import run_entry_point
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from torchtune_xgb.distributed.sharding import gather_optimizer_state, gather_rows, load_optimizer_state, local
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.export.fold import clean_name
from torchtune_xgb.method.loraxs import convert_to_loraxs
from torchtune_xgb.models.cache import register_resolvers
from torchtune_xgb.quant.nf4 import is_nf4
from torchtune_xgb.quant.nf4_sharding import nf4_dtensor_shard, prepare_nf4_for_row_sharding
from torchtune_xgb.recipe_mixin import BoostedRecipeMixin
from torchtune_xgb.run.run_lock import release_owner_locks
from torchtune_xgb.torchtune_recipes import load_recipe_module

register_resolvers()
_torchtune_lora = load_recipe_module("lora_finetune_distributed")
log = utils.get_logger("INFO")

# Debug aid for the tests: each rank appends "round blocks" lines to <value>.rank<R>.
SELECTION_LOG_ENV = "TORCHTUNE_XGB_SELECTION_LOG"


def process_group_backend() -> str:
    """NCCL for CUDA tensors where there is CUDA, gloo for CPU tensors always."""
    return "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"


class _NoLogger:
    """Metric logger of ranks other than 0 (torchtune creates the real one on rank 0 only)."""

    def log_dict(self, *args, **kwargs) -> None:
        pass

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class XGBLoRAFinetuneRecipeDistributed(BoostedRecipeMixin, _torchtune_lora.LoRAFinetuneRecipeDistributed):
    """torchtune's FSDP2 LoRA recipe with boosted rank-r rounds (see BoostedRecipeMixin)."""

    # --- launch-mode hooks ----------------------------------------------------------------
    def _is_main_process(self) -> bool:
        return self._is_rank_zero

    def _rank0_decides(self, value: bool) -> bool:
        flag = torch.tensor([int(value)], device=self._device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _any_rank_signal(self, signum: int) -> int:
        # every rank must stop at the same step: a signal that reached one rank stops them all
        flag = torch.tensor([signum], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def _all_ranks_done(self, done: bool) -> bool:
        flag = torch.tensor([int(done)], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _wait_for_all_ranks(self) -> None:
        dist.barrier()

    def _scale_grads(self, num_tokens: torch.Tensor) -> None:
        dist.all_reduce(num_tokens)  # in place: the step's loss is normalised by all ranks' tokens
        # FSDP2's reduce-scatter averages over ranks: multiply the world size back in
        training.scale_grads(self._model, self.world_size / num_tokens.clamp(min=1))  # 0 tokens: see the mixin

    def _reduce_loss(self, running_loss: torch.Tensor) -> torch.Tensor:
        running_loss = running_loss.clone()
        dist.all_reduce(running_loss)
        return running_loss

    def _optimizer_state_dict(self) -> Dict[str, Any]:
        return gather_optimizer_state(self._optimizer)

    def _load_optimizer_state(self, state: Dict[str, Any]) -> None:
        load_optimizer_state(self._optimizer, state)

    def _model_state_dict(self) -> Dict[str, torch.Tensor]:
        return training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)

    def _merged_weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Export is the one place full weights are gathered: one module at a time, on rank 0.

        Every rank must drain this iterator (each step is a collective); other ranks get
        ``(name, None)``.
        """
        for name, rows in self._booster.export_weights(self._dtype):
            weight = self._booster.modules[name].weight
            gathered = gather_rows(rows, weight, weight.shape[0]).cpu()
            yield name, (gathered if self._is_rank_zero else None)

    # --- setup ----------------------------------------------------------------------------
    def setup(self, cfg: DictConfig) -> None:
        if not self._is_rank_zero:
            self._metric_logger = _NoLogger()
        super().setup(cfg)
        self._log_selection(self._booster.round)

    def _setup_model(self, *args, **kwargs):
        with self._torchtune_setup_patches():
            return super()._setup_model(*args, **kwargs)

    @contextlib.contextmanager
    def _torchtune_setup_patches(self):
        """Narrow hooks into torchtune's ``_setup_model``, for its duration only:

        - on CPU, its CUDA-only memory statistics after model init are skipped;
        - just before ``fully_shard``, :meth:`_before_sharding` runs on the meta model (LoRA-XS
          modules replace the LoRA ones; NF4 weights get scaler blocks that the shards can hold);
        - NF4 weights are loaded by :meth:`_load_nf4_shards`, everything else by torchtune;
        - the LoRA-XS tensors, which no base checkpoint holds, count as adapter keys when
          torchtune validates the loaded keys.
        """
        names = ("get_memory_stats", "log_memory_stats", "shard_model", "load_from_full_model_state_dict")
        saved_training = {k: getattr(training, k) for k in names}
        saved_validate = _torchtune_lora.validate_missing_and_unexpected_for_lora
        shard_model = saved_training["shard_model"]
        load_full = saved_training["load_from_full_model_state_dict"]

        def shard_after_conversion(model, *args, **kwargs):
            self._before_sharding(model)
            return shard_model(model, *args, **kwargs)

        def load_with_nf4_shards(model, full_sd, device, strict=False, cpu_offload=False):
            sharded = model.state_dict()
            nf4_keys = {k for k, v in sharded.items() if is_nf4(local(v))} & full_sd.keys()
            rest = {k: v for k, v in full_sd.items() if k not in nf4_keys}  # the caller's dict stays whole
            result = load_full(model, rest, device, strict=strict, cpu_offload=cpu_offload)
            self._load_nf4_shards(model, {k: (sharded[k], full_sd[k]) for k in nf4_keys}, device, cpu_offload)
            result.missing_keys[:] = [k for k in result.missing_keys if clean_name(k) not in nf4_keys]
            return result

        def validate(*args, base_missing=None, **kwargs):
            base_missing = [k for k in base_missing or [] if not any(f".{x}" in k for x in ("xs_a", "xs_b", "xs_core"))]
            return saved_validate(*args, base_missing=base_missing, **kwargs)

        if self._device.type != "cuda":
            training.get_memory_stats = lambda *a, **k: {}
            training.log_memory_stats = lambda *a, **k: None
        training.shard_model = shard_after_conversion
        training.load_from_full_model_state_dict = load_with_nf4_shards
        if self._adapter.method == "loraxs":
            _torchtune_lora.validate_missing_and_unexpected_for_lora = validate
        try:
            yield
        finally:
            for key, value in saved_training.items():
                setattr(training, key, value)
            _torchtune_lora.validate_missing_and_unexpected_for_lora = saved_validate

    def _before_sharding(self, model: nn.Module) -> None:
        """On the meta model, just before ``fully_shard``."""
        if self._adapter.method == "loraxs":
            self._convert_to_loraxs(model)
        prepare_nf4_for_row_sharding(model, dist.get_world_size())

    def _convert_to_loraxs(self, model: nn.Module) -> None:
        """LoRA-XS: swap the (meta) LoRA modules for LoRA-XS ones and give them real, zero tensors
        (the SVD fills A and B once the base is loaded); A and B stay replicated buffers.

        Before ``fully_shard``: FSDP2 manages the parameters of the modules it sharded; a module
        swapped in afterwards would keep a sharded weight in its forward pass."""
        modules = convert_to_loraxs(model, self._adapter.sigma, self._adapter.init)
        for module in modules.values():
            for key in ("xs_a", "xs_b"):
                module.register_buffer(key, torch.zeros_like(getattr(module, key), device=self._device))
            module.xs_core = nn.Parameter(torch.zeros_like(module.xs_core, device=self._device))
        set_trainable_params(model, get_adapter_params(model))

    @staticmethod
    def _load_nf4_shards(model: nn.Module, weights: Dict[str, tuple], device, cpu_offload: bool) -> None:
        """Load NF4 weights, ``{key: (current sharded NF4 parameter, full checkpoint tensor)}``: each
        rank quantizes the whole tensor as one device would and keeps its rows (nf4_sharding.py).

        torchtune's own NF4 branch re-quantizes in the training dtype with the shard's (possibly
        smaller) scaler blocks, which is not the single-device weight."""
        shards = {}
        for key, (sharded, tensor) in weights.items():
            shard = nf4_dtensor_shard(sharded, tensor, device)
            shards[key] = nn.Parameter(shard.cpu() if cpu_offload else shard, requires_grad=False)
        model.load_state_dict(shards, strict=False, assign=True)

    # --- training -------------------------------------------------------------------------
    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Token-mean loss of one micro-batch (as torchtune's single-device ``_loss_step``)."""
        labels = batch.pop("labels")
        with self.activations_handling_ctx:
            logits = self._model(**batch)
        labels = torch.hstack((labels[..., 1:], self.ignore_labels_cache[: labels.shape[0]]))
        if not isinstance(logits, list):
            labels = labels.reshape(-1)
            logits = logits.reshape(-1, logits.size(-1))
        loss = self._loss_fn(logits, labels)
        del logits
        return loss

    def cleanup(self) -> None:
        """Close the metric logger and wait until every rank is past its last collective.

        Unlike torchtune's ``cleanup`` this does not destroy the process group: the worker ends
        with ``os._exit`` right after (``leave_without_teardown`` says why); after the barrier no
        rank has anything in flight, and process exit closes the sockets.
        """
        if self._is_rank_zero:
            self._metric_logger.close()
        dist.barrier()

    def _log_round(self, report) -> None:
        super()._log_round(report)
        self._log_selection(self._booster.round)

    def _log_selection(self, round_index: int) -> None:
        """With TORCHTUNE_XGB_SELECTION_LOG set, record the blocks this rank switched on."""
        path = os.environ.get(SELECTION_LOG_ENV)
        if not path:
            return
        b = self._booster
        active = sorted({b.block_of[n] for n, m in b.modules.items() if m.active and b.block_of[n] is not None})
        with open(f"{path}.rank{self.rank}", "a") as f:
            f.write(json.dumps({"round": round_index, "selected": b.selected_blocks(round_index), "active": active}) + "\n")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Train with XGBLoRA under FSDP2; config keys as torchtune's distributed LoRA recipe plus ``boost:``."""
    if not training.is_distributed():
        raise ConfigError(
            "--nproc_per_node: the distributed recipe needs a distributed launcher "
            "(tune run --nproc_per_node N xgblora_finetune …, or torchrun)"
        )
    dist.init_process_group(process_group_backend())
    if cfg.get("fsdp_cpu_offload", False):
        training.set_torch_num_threads()
    config.log_config(recipe_name="XGBLoRAFinetuneRecipeDistributed", cfg=cfg)
    recipe = XGBLoRAFinetuneRecipeDistributed(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    # no destroy_process_group, on success or error (as torchtitan: destroying it while another
    # rank is still in a collective can hang); see cleanup and leave_without_teardown
    recipe.cleanup()


def main() -> int:
    """Run the recipe; the worker process then ends without interpreter teardown, whatever the
    outcome (an unexpected exception is printed and ends the worker with code 1)."""
    try:
        code = run_entry_point(recipe_main)
    except BaseException:  # noqa: B036 -- a traceback, then the same teardown-free exit
        traceback.print_exc()
        code = 1
    leave_without_teardown(code)
    return code  # not reached


def leave_without_teardown(code: int) -> None:
    """Flush everything and end the process with ``code``, skipping interpreter finalisation.

    Why: gloo's worker thread frees each finished collective (the last ones: the barrier in
    ``cleanup`` and the work it chains to) on its own schedule, and freeing one drops tensors
    whose last reference is a Python object, which needs the GIL. If the main thread is by then
    finalising the interpreter, that thread is ended mid-destructor and the process aborts
    ("terminate called without an active exception", SIGABRT) after a run whose checkpoint and
    logs are complete: 2 runs in about 60 on 2 loaded cores, traced from a core dump
    (ProcessGroupGloo::runLoop → ~AsyncBarrierWork → decref → take_gil → pthread_exit).
    ``destroy_process_group`` does not prevent it (DTensor's sharding caches keep the group
    through ``DeviceMesh._pg_registry``). Everything the recipe writes is closed by now:
    ``cleanup`` closes the metric logger, the checkpointer and summary files are closed on write.
    """
    import logging

    release_owner_locks()  # the run lock where the filesystem has no flock (atexit is skipped)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
