"""NF4 bases: merged rounds live beside the 4-bit weights, never re-quantized into them."""

import pytest
import torch
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
from torchtune import training
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules.peft import LoRALinear

from tests.tiny_model import TINY, tiny_base
from torchtune_xgb.config.boost_config import AdapterConfig, BoostConfig
from torchtune_xgb.export.fold import fold_merged_weights
from torchtune_xgb.method.boosting import Booster
from torchtune_xgb.method.merged_state import MergedState
from torchtune_xgb.method.xgblora import convert_to_xgblora, merged_path
from torchtune_xgb.quant.nf4 import fitting_nf4_blocks, fitting_scaler_block, keep_unquantizable_in_full_precision


def nf4_module(out_dim=256, in_dim=256, seed=0):
    with training.set_default_dtype(torch.bfloat16), fitting_nf4_blocks():
        holder = torch.nn.Module()
        holder.m = LoRALinear(in_dim, out_dim, rank=1, alpha=1.0, quantize_base=True)
    with torch.no_grad():
        w = torch.randn(out_dim, in_dim, generator=torch.Generator().manual_seed(seed)) * 0.02
        holder.m.weight.copy_(w.bfloat16())  # NF4 copy_: quantizes with the tensor's own blocks
    return convert_to_xgblora(holder)["m"]


def kept(after, before, update):
    return 1 - (torch.linalg.matrix_norm(after - before - update) / torch.linalg.matrix_norm(update)).item()


def test_merges_keep_everything_where_requantizing_destroys_them():
    module = nf4_module()
    quantized = module.weight.quantized_data.clone()
    state = MergedState({"m": module})
    w_deq = module.weight.get_original_weight().float()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 256, generator=gen).bfloat16()
    total = torch.zeros(256, 256)
    for _ in range(4):
        b, a = torch.randn(256, 1, generator=gen), torch.randn(1, 256, generator=gen)
        scale = 1e-2 * torch.linalg.matrix_norm(w_deq) / torch.linalg.matrix_norm(b @ a)  # ‖ΔW‖/‖W‖ = 1e-2
        with torch.no_grad():
            module.lora_b.weight.copy_(b * scale)
            module.lora_a.weight.copy_(a)
        update = module.lora_b.weight.float() @ module.lora_a.weight.float()  # α/r = 1
        report = state.merge_round(["m"])
        assert report.kept_fraction >= 0.99
        # the naive alternative, same update: fold into the weights and re-quantize
        naive = to_nf4((w_deq + total + update).bfloat16(), 64, module.weight.scaler_block_size)
        naive_kept = kept(naive.get_original_weight().float(), (w_deq + total), update)
        assert naive_kept < 0.2, naive_kept
        total += update
        module.reset_adapter()
    assert torch.equal(module.weight.quantized_data, quantized)  # the 4-bit weights never changed
    assert torch.allclose(state.delta("m"), total, atol=1e-6)
    with torch.no_grad():  # the forward pass uses NF4 + the merged state
        got = module(x).float()
    expected = x.float() @ (w_deq + total).T
    assert torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected) < 1e-2


@pytest.mark.parametrize("numel,scaler", [(576 * 576, 216), (192 * 576, 216), (1536 * 576, 256), (64 * 64, 64), (100, 0)])
def test_fitting_scaler_block_hand_values(numel, scaler):
    # 576·576/64 = 5184 = 2⁶·3⁴: the largest divisor ≤ 256 is 216; 1536·576/64 = 13824 = 256·54
    assert fitting_scaler_block(numel) == scaler


def test_shape_nf4_cannot_take_stays_full_precision_with_warning(caplog):
    with training.set_default_dtype(torch.bfloat16), fitting_nf4_blocks():
        holder = torch.nn.Module()
        holder.odd = LoRALinear(10, 10, rank=1, alpha=1.0, quantize_base=True)  # 100 weights
        holder.fine = LoRALinear(64, 64, rank=1, alpha=1.0, quantize_base=True)
    assert keep_unquantizable_in_full_precision(holder) == ["odd"]
    assert isinstance(holder.fine.weight, NF4Tensor) and not isinstance(holder.odd.weight, NF4Tensor)
    assert holder.odd(torch.randn(2, 10).bfloat16()).shape == (2, 10)


def nf4_tiny_model():
    with training.set_default_dtype(torch.bfloat16), fitting_nf4_blocks():
        model = lora_llama3_2(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=2,
                              lora_alpha=4.0, quantize_base=True, **TINY)
    base = tiny_base(seed=0).state_dict()
    model.load_state_dict({k: v.bfloat16() for k, v in base.items()}, strict=False)
    return model, base


@pytest.mark.parametrize("merge_base", ["dequantized", "original"])
def test_export_reproduces_trained_nf4_model(merge_base):
    model, base = nf4_tiny_model()
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    originals = {n: base[f"{n}.weight"].bfloat16() for n in names}
    booster = Booster(model, BoostConfig(steps_per_round=1), AdapterConfig(merge_base=merge_base), originals=originals).start()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        with torch.no_grad():
            for m in booster.active_modules().values():
                m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=gen) * 0.05)
        booster.end_round()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 10), generator=gen)
    with torch.no_grad():
        live = model(tokens).float()
    # a QLoRA run holds no full-precision copy of the model: none for "dequantized", and for
    # "original" the checkpoint's tensors themselves (taken over, not copied)
    assert booster.originals is None
    held = booster.merged._base
    assert (held == {}) if merge_base == "dequantized" else all(held[n].data_ptr() == originals[n].data_ptr() for n in names)
    exported = fold_merged_weights(model.state_dict(), booster.export_weights(torch.bfloat16), dtype=torch.bfloat16)
    plain = llama3_2(**TINY).bfloat16()
    plain.load_state_dict(exported, strict=False)
    with torch.no_grad():
        out = plain(tokens).float()
    rel = (torch.linalg.vector_norm(out - live) / torch.linalg.vector_norm(live)).item()
    for name in names:
        base_w = originals[name].float() if merge_base == "original" else model.get_submodule(name).weight.get_original_weight().float()
        assert torch.allclose(exported[f"{name}.weight"].float(), (base_w + booster.merged.delta(name)).bfloat16().float())
    if merge_base == "dequantized":
        assert rel < 2e-2, rel  # bf16 rounding of the folded weights only
    else:
        assert rel > 2e-2  # the NF4 quantization error is gone from the export: a different model


def test_loraxs_on_nf4_decomposes_the_full_precision_weight():
    from torchtune_xgb.config.boost_config import SVDConfig
    from torchtune_xgb.method.loraxs import truncated_svd

    model, base = nf4_tiny_model()
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    originals = {n: base[f"{n}.weight"].bfloat16() for n in names}
    nf4_weight = {n: model.get_submodule(n).weight.get_original_weight() for n in names}
    booster = Booster(model, BoostConfig(steps_per_round=1), AdapterConfig(method="loraxs"), originals=originals)
    booster.start(total_steps=2)
    assert booster.originals is None  # "rotate" took its one SVD: the references are dropped
    for name in names:
        _, s, _ = booster.svd_factors[name]
        _, s_orig, _ = truncated_svd(originals[name], s.numel(), SVDConfig())
        _, s_nf4, _ = truncated_svd(nf4_weight[name], s.numel(), SVDConfig())
        assert torch.allclose(s, s_orig)  # the checkpoint's weight, not its 4-bit version
        assert not torch.allclose(s, s_nf4, rtol=1e-3)


# --- FSDP2: row shards of one quantization (no process group needed) ------------------------------

def single_device_nf4(weight: torch.Tensor) -> NF4Tensor:
    """What one device holds after loading ``weight`` into an NF4 LoRALinear (torchtune's path)."""
    out_dim, in_dim = weight.shape
    with training.set_default_dtype(torch.bfloat16), fitting_nf4_blocks():
        module = LoRALinear(in_dim, out_dim, rank=1, alpha=1.0, quantize_base=True)
    module.load_state_dict({"weight": weight}, strict=False)  # NF4 copy_: quantizes the source as given
    return module.weight


class _Group:  # what NF4Tensor.fsdp_pre_all_gather asks of a mesh: the group size
    def __init__(self, size):
        self._size = size

    def get_group(self):
        return self

    def size(self):
        return self._size


@pytest.mark.parametrize("shape,world", [((64, 64), 2), ((128, 64), 4), ((192, 576), 2), ((192, 576), 3)])
def test_row_shards_rebuild_the_single_device_weight_bit_for_bit(shape, world):
    from torchtune_xgb.quant.nf4 import nf4_row_shard, quantize_full, shard_scaler_block

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.02  # fp32 checkpoint tensor
    reference = single_device_nf4(weight)
    full = quantize_full(weight, 64, fitting_scaler_block(weight.numel()), torch.bfloat16, torch.device("cpu"))
    for field in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
        assert torch.equal(getattr(full, field), getattr(reference, field)), field
    sub = shard_scaler_block("m", shape, 64, full.scaler_block_size, world)
    shards = [nf4_row_shard(full, rank, world, sub) for rank in range(world)]
    expected = reference.get_original_weight()
    rows = shape[0] // world
    for rank, shard in enumerate(shards):
        assert shard.shape == (rows, shape[1]) and shard.scaler_block_size == sub
        assert torch.equal(shard.get_original_weight(), expected[rank * rows : (rank + 1) * rows])
    # FSDP2's all-gather: every rank's fields concatenated, rebuilt with the *local* metadata
    gathered_fields = [torch.cat(parts) for parts in zip(*[s.fsdp_pre_all_gather(_Group(world))[0] for s in shards])]
    _, metadata = shards[-1].fsdp_pre_all_gather(_Group(world))
    gathered, _ = shards[-1].fsdp_post_all_gather(tuple(gathered_fields), metadata, torch.bfloat16)
    assert torch.equal(gathered.get_original_weight(), expected)


@pytest.mark.parametrize("shape,world", [((64, 64), 1), ((192, 576), 1), ((64, 64), 2), ((192, 576), 3)])
def test_packed_all_gather_is_one_buffer_and_rebuilds_the_single_device_weight(shape, world):
    """FSDP2 (torch ≥ 2.9) unshards a one-rank group from all_gather_inputs[0] alone: the shard
    must hand it ONE buffer. Simulated as FSDP does it: each rank's inputs flattened and
    concatenated rank after rank, then the post-all-gather into a new tensor and into ``out``."""
    from torchtune_xgb.quant.nf4 import nf4_row_shard, quantize_full, shard_scaler_block
    from torchtune_xgb.quant.nf4_all_gather import PackedNF4Tensor, packed_nf4

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 0.02
    expected = single_device_nf4(weight).get_original_weight()  # torchtune's single-device quantization
    full = quantize_full(weight, 64, fitting_scaler_block(weight.numel()), torch.bfloat16, torch.device("cpu"))
    sub = shard_scaler_block("m", shape, 64, full.scaler_block_size, world)
    shards = [packed_nf4(nf4_row_shard(full, rank, world, sub)) for rank in range(world)]
    inputs = [s.fsdp_pre_all_gather(_Group(world)) for s in shards]
    assert all(len(ins) == 1 and ins[0].dtype == torch.uint8 for ins, _ in inputs)
    gathered_buffer = torch.cat([ins[0].view(-1) for ins, _ in inputs])  # FSDP's all-gather output
    metadata = inputs[-1][1]
    gathered, inner = shards[-1].fsdp_post_all_gather((gathered_buffer,), metadata, torch.bfloat16)
    assert gathered.shape == shape and torch.equal(gathered.get_original_weight(), expected)
    # later unshards write into the same tensor (FSDP re-allocated the fields it was handed)
    for field in inner:
        field.zero_()
    assert shards[0].fsdp_post_all_gather((gathered_buffer,), metadata, torch.bfloat16, out=gathered) is None
    assert torch.equal(gathered.get_original_weight(), expected)
    # what DTensor and FSDP2 do to a local shard keeps the one-buffer all-gather
    for derived in (shards[0].view_as(shards[0]), shards[0].detach(), shards[0].to("cpu")):
        assert type(derived) is PackedNF4Tensor


def test_shard_scaler_block_splits_scaler_blocks_and_names_unsplittable_modules():
    from torchtune_xgb.errors import ConfigError
    from torchtune_xgb.quant.nf4 import shard_scaler_block

    # 64×64: 64 blocks in one scaler block of 64; two shards of 32 blocks → scaler blocks of 32
    assert shard_scaler_block("q", (64, 64), 64, 64, 2) == 32
    # SmolLM2 q_proj 576×576 on 2 ranks: 2592 blocks per shard, 216 divides it → unchanged
    assert shard_scaler_block("q", (576, 576), 64, 216, 2) == 216
    with pytest.raises(ConfigError, match=r"model.quantize_base: layers.0.attn.k_proj \(3×64\)"):
        shard_scaler_block("layers.0.attn.k_proj", (3, 64), 64, 3, 2)  # rows not divisible
    with pytest.raises(ConfigError, match="whole NF4 blocks"):
        shard_scaler_block("m", (2, 32), 64, 1, 2)  # a shard of 32 values cuts a 64-value block


def test_meta_nf4_weights_get_shard_sized_scaler_blocks_before_sharding():
    from torchtune_xgb.errors import ConfigError
    from torchtune_xgb.quant.nf4_sharding import prepare_nf4_for_row_sharding

    with training.set_default_dtype(torch.bfloat16), fitting_nf4_blocks(), torch.device("meta"):
        model = lora_llama3_2(lora_attn_modules=["q_proj", "v_proj"], lora_rank=2, lora_alpha=4.0, quantize_base=True, **TINY)
    changed = prepare_nf4_for_row_sharding(model, world=2)
    assert "layers.0.attn.q_proj" in changed  # 64×64: its one scaler block of 64 would be cut in two
    q = model.layers[0].attn.q_proj.weight
    assert isinstance(q, NF4Tensor) and q.is_meta and q.scaler_block_size == 32 and q.quantization_factor.numel() == 2
    with pytest.raises(ConfigError, match=r"model.quantize_base: layers.0.attn.q_proj \(64×64\) cannot be split over 3 ranks"):
        prepare_nf4_for_row_sharding(model, world=3)


def test_the_view_beside_nf4_matches_the_exact_rounds_to_bf16_accuracy():
    """The view (fp32 factors, applied in bf16) gives the bf16 rounding of the exact (float64)
    product x·Lᵀ up to the roundings of a bf16 matmul: relative error ~2⁻⁸, against the merged
    rounds' own size. While the rounds fit in the view it holds them exactly (fp32)."""
    module = nf4_module(out_dim=128, in_dim=128)
    state = MergedState({"m": module}, nf4_view_rank=8)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        with torch.no_grad():
            module.lora_b.weight.copy_(torch.randn(128, 1, generator=gen) * 1e-2)
            module.lora_a.weight.copy_(torch.randn(1, 128, generator=gen))
        state.merge_round(["m"])
    exact = state.delta("m").double()
    held = module.merged_u.double() @ module.merged_v.double()  # 5 rounds in rank 8: as stored
    assert torch.allclose(held, exact, rtol=1e-6, atol=1e-9)
    assert tuple(module.merged_u.shape) == (128, 8) and module.merged_u[:, 5:].abs().max() == 0
    x = torch.randn(6, 128, generator=gen).to(torch.bfloat16)
    reference = x.double() @ exact.T
    out = merged_path(module, x)
    assert out.dtype == torch.bfloat16
    got = out.double()
    assert torch.linalg.vector_norm(got - reference) / torch.linalg.vector_norm(reference) < 2**-7
