"""Fixed-length random token sequences: a dataset that fills a GPU for throughput runs.

The arithmetic task's samples are ~50 tokens long, far too short to keep a GPU busy, and no
real corpus can be downloaded on the benchmark machines. Speed and memory depend on sequence
length and batch, not on which tokens are trained, so throughput runs on a GPU use
``dataset._component_=benchmarks.synthetic_data.random_tokens`` with ``seq_len`` equal to
``tokenizer.max_seq_len``. Every recipe reads it like any torchtune SFT dataset.
"""

from typing import Any, Dict, List

import torch
from torch.utils.data import Dataset


class RandomTokens(Dataset):
    """``n`` samples of ``seq_len`` token ids drawn uniformly from [3, vocab) (0-2 are the ChatML
    special tokens), seeded; every token is a label."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(3, vocab, (n, seq_len), generator=gen)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        ids = self.tokens[index].tolist()
        return {"tokens": ids, "labels": list(ids)}


def random_tokens(tokenizer: Any, seq_len: int = 2048, n: int = 512, seed: int = 0, **_: Any) -> RandomTokens:
    """torchtune dataset builder: ``tokenizer`` only bounds the ids (its vocabulary size)."""
    vocab = getattr(tokenizer, "vocab_size", None) or 256
    return RandomTokens(n, seq_len, vocab, seed)
