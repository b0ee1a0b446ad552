"""SmolLM2 model builders for torchtune configs.

SmolLM2 is a llama architecture; torchtune's ``llama3_2`` component builders build it once given
the right sizes. Use in YAML as ``_component_: torchtune_xgb.models.smollm2.smollm2_135m`` (or
``lora_smollm2_135m``) and load weights prepared by ``tune-xgb prepare smollm2-135m-instruct``
with ``FullModelHFCheckpointer(model_type: LLAMA3_2)``.
"""

from typing import List

from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder

# Architecture of SmolLM2-135M(-Instruct), in torchtune builder argument names. The one place
# these numbers live: prepare.py checks the GGUF metadata against it and writes config.json from it.
SMOLLM2_135M = {
    "vocab_size": 49152,
    "num_layers": 30,
    "num_heads": 9,
    "num_kv_heads": 3,
    "embed_dim": 576,
    "intermediate_dim": 1536,
    "max_seq_len": 8192,
    "rope_base": 100_000,
    # llama3_2's default scale_factor=32 silently applies Llama-3.1 RoPE scaling; SmolLM2 has none.
    "scale_factor": 1,
    "norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def smollm2_135m() -> TransformerDecoder:
    """SmolLM2-135M as a plain torchtune ``TransformerDecoder`` (tied input/output embedding)."""
    return llama3_2(**SMOLLM2_135M)


def lora_smollm2_135m(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 1,
    lora_alpha: float = 2.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """SmolLM2-135M with LoRA adapters on the given projections.

    ``lora_attn_modules`` names attention projections (``q_proj``, ``k_proj``, ``v_proj``,
    ``output_proj``); ``apply_lora_to_mlp`` adds ``w1``/``w2``/``w3``. With tied embeddings the
    output projection is the embedding, so ``apply_lora_to_output=True`` is rejected by torchtune.
    """
    return lora_llama3_2(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **SMOLLM2_135M,
    )
