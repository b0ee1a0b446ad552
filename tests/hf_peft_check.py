"""Run by tests/export/test_hf_export.py with the Hugging Face venv's python (``.venv-hf``: transformers,
peft; no torchtune, no torchao, which peft 0.21 refuses below 0.16).

    python hf_peft_check.py BASE_DIR OUT_FILE RUN_DIR...

For every run directory, loads ``epoch_0/`` with ``AutoModelForCausalLM.from_pretrained`` and
``epoch_0/adapter/`` with ``PeftModel.from_pretrained`` on the base and with
``AutoPeftModelForCausalLM``; writes their logits on fixed tokens (fp32) and what each loader
saw to OUT_FILE (safetensors + a JSON sidecar). Asserts nothing itself: the test compares.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
import transformers
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import save_file

TOKENS = torch.arange(1, 17).unsqueeze(0)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits[0].float().contiguous()


def main(base_dir: str, out_file: str, *run_dirs: str) -> None:
    load = dict(dtype=torch.float32)
    tensors, info = {}, {"transformers": transformers.__version__, "peft": __import__("peft").__version__, "runs": {}}
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, **load)
    tensors["base"] = logits(base)
    for run in run_dirs:
        name = Path(run).name
        epoch = Path(run) / "epoch_0"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = transformers.AutoModelForCausalLM.from_pretrained(str(epoch), **load)
        tensors[f"{name}/merged"] = logits(merged)
        run_info = {
            # transformers applies an adapter it finds beside the weights (PEFT integration)
            "merged_has_adapter": bool(getattr(merged, "_hf_peft_config_loaded", False)),
            "merged_warnings": [str(w.message) for w in caught if "adapter" in str(w.message).lower()],
        }
        fresh_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, **load)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(fresh_base, str(epoch / "adapter"))
        tensors[f"{name}/peft"] = logits(peft_model)
        # keys PEFT could not place would leave the update out silently: record any such warning
        run_info["peft_warnings"] = [str(w.message) for w in caught]
        auto = AutoPeftModelForCausalLM.from_pretrained(str(epoch / "adapter"), **load)
        tensors[f"{name}/auto_peft"] = logits(auto)
        run_info["lora_modules"] = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default"))
        info["runs"][name] = run_info
    save_file(tensors, out_file)
    Path(out_file).with_suffix(".json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
