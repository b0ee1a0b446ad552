"""A tiny 2-layer llama3.2-shaped model for fast CPU tests (no weights downloaded)."""

import torch
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2

TINY = dict(
    vocab_size=320,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    max_seq_len=256,
    intermediate_dim=128,
    rope_base=10000,
    norm_eps=1e-5,
    scale_factor=1,
    tie_word_embeddings=True,
)


def tiny_base(seed: int = 0, dtype=torch.float32):
    """Seeded random weights at a GPT-like scale (std 0.02), so the loss starts near ln(vocab)."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = llama3_2(**TINY)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
    return model.to(dtype)


def tiny_lora(rank=1, alpha=2.0, targets=("q_proj", "v_proj"), mlp=False, num_layers=2, seed=0, dtype=torch.float32):
    """A LoRA model whose base weights equal ``tiny_base(seed)`` (random, not zero)."""
    dims = dict(TINY, num_layers=num_layers)
    torch.manual_seed(seed)
    base = llama3_2(**dims).to(dtype)
    model = lora_llama3_2(
        lora_attn_modules=list(targets), apply_lora_to_mlp=mlp, lora_rank=rank, lora_alpha=alpha, **dims
    ).to(dtype)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    return model
