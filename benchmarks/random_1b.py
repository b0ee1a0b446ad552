"""A Llama-3.2-1B-shaped model with random weights, for throughput runs on a GPU.

Speed and memory do not depend on the weights' values, and no 1B checkpoint can be downloaded
here, so ``--model 1b-random`` builds torchtune's ``llama3_2_1b`` (16 layers, dim 2048, FFN 8192,
32/8 heads, vocabulary 128256, tied embedding) with random bf16 weights and saves it once as an
HF directory in the cache, with the SmolLM2 tokenizer (its ids are < 49152, inside the vocabulary).
"""

from pathlib import Path
from typing import Optional

from torchtune_xgb.models.cache import cache_path

NAME = "llama3_2-1b-random"
LLAMA3_2_1B = dict(
    vocab_size=128_256,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=2048,
    intermediate_dim=8192,
    max_seq_len=131_072,
    rope_base=500_000,
    norm_eps=1e-5,
)


def random_1b_dir(tokenizer_json: Optional[Path] = None) -> Path:
    """Path of the HF directory (built on first use, ~2.5 GB in bf16, seeded: same every time).

    ``tokenizer_json``: the tokenizer saved with it (default SmolLM2's, which needs the converted
    model; gpu_check passes the tests' small ChatML tokenizer, whose ids are < 300)."""
    out = cache_path(NAME)
    if (out / "config.json").exists():
        return out
    import torch
    from torchtune import training
    from torchtune.models.llama3_2 import llama3_2_1b

    from torchtune_xgb.models.hf_io import llama_hf_config, save_hf_checkpoint

    tokenizer_json = tokenizer_json or cache_path("smollm2-135m-instruct") / "tokenizer.json"
    if not tokenizer_json.exists():
        raise FileNotFoundError(f"{tokenizer_json}: run `tune-xgb prepare smollm2-135m-instruct` first")
    print(f"building a random 1B-shaped llama3_2 in {out} (once)")
    torch.manual_seed(0)
    # initialised on the GPU where there is one (seconds instead of ~20 s on 16 CPU cores)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with training.set_default_dtype(torch.bfloat16), torch.device(device):
        model = llama3_2_1b()
    config = llama_hf_config(**LLAMA3_2_1B, tie_word_embeddings=True, torch_dtype="bfloat16")
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    del model
    save_hf_checkpoint(state, out, config, tokenizer_json=tokenizer_json)
    return out
