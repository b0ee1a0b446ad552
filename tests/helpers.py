"""Test helpers: a tiny ChatML tokenizer built offline.

Tiny random test models (2 layers, small vocab) are trained end to end through the same
:class:`torchtune_xgb.models.chatml.ChatMLTokenizer` as SmolLM2; this gives them a
``tokenizer.json`` without a download or the real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Union

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
TINY_VOCAB_SIZE = 300


def _tiny_corpus() -> List[str]:
    """Deterministic ChatML arithmetic chat text (the kind of data the tiny models train on)."""
    lines = []
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            lines.append(
                "<|im_start|>system\nYou are a calculator.<|im_end|>\n"
                f"<|im_start|>user\nWhat is {a} + {b}?<|im_end|>\n"
                f"<|im_start|>assistant\nThe answer is {a + b}.<|im_end|>\n"
            )
            lines.append(f"Compute {a} - {b} = {a - b}. Then {a} times {b} is {a * b}.")
    return lines


def build_tiny_tokenizer_json(path: Union[str, Path], vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Write a small byte-level BPE ``tokenizer.json`` to ``path`` and return ``path``.

    Same shape as SmolLM2's tokenizer: special tokens ``<|endoftext|>``=0, ``<|im_start|>``=1,
    ``<|im_end|>``=2, all 256 byte symbols, pre-tokenizer
    ``Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]`` and a
    ByteLevel decoder; the remaining ``vocab_size - 259`` entries are BPE merges trained on a fixed
    in-code corpus, so the file is identical on every run. A model for it needs
    ``vocab_size >= tokenizer.get_vocab_size()``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,  # first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def output_dir_cfg(out, resume: bool = False, metrics_file=None, **keys):
    """The keys of a run config that claiming ``out`` reads (run/output_dir.py), for unit tests of
    the claim: ``output_dir``, ``resume_from_checkpoint`` and a DiskLogger writing ``metrics_file``."""
    from pathlib import Path

    from omegaconf import OmegaConf

    cfg = {"output_dir": str(out), "resume_from_checkpoint": resume, **keys}
    if metrics_file is not None:
        metrics = Path(metrics_file)
        cfg["metric_logger"] = {"_component_": "torchtune.training.metric_logging.DiskLogger",
                                "log_dir": str(metrics.parent), "filename": metrics.name}
    return OmegaConf.create(cfg)
