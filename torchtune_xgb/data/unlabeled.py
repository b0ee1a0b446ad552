"""Samples that train nothing: every label masked, usually because the prompt fills ``max_seq_len``.

With ``train_on_input=False`` only the answer's tokens are labels; torchtune truncates a sample
to ``tokenizer.max_seq_len``, so a prompt that long leaves no label token. Such a sample adds
nothing to the loss or the gradient (run/loop.py; a step made only of them is skipped), and
torchtune says nothing about it. :func:`count_unlabeled` counts them once before training, for
the one line the recipes print.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class UnlabeledCount:
    """How many of a dataset's ``samples`` have no label token: ``truncated`` of them were cut at
    ``max_seq_len`` (the prompt filled it), ``other`` were not (e.g. an empty answer)."""

    samples: int
    truncated: int
    other: int
    max_seq_len: Optional[int]

    def line(self) -> str:
        """The line the recipes print before training."""
        limit = f"tokenizer.max_seq_len={self.max_seq_len}"
        if not self.truncated and not self.other:
            return f"dataset: all {self.samples} samples keep label tokens within {limit}"
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} of {self.samples} samples lose all their label tokens to {limit} "
                         "(the prompt fills it)")
        if self.other:
            parts.append(f"{self.other} {'more' if self.truncated else f'of {self.samples} samples'} have no label token")
        return (f"dataset: {'; '.join(parts)}: they add nothing to the loss or the gradient, and a step made only of "
                "them applies no update (counted as skipped_steps)")


def _has_label(labels, ignore_index: int) -> bool:
    if isinstance(labels, torch.Tensor):
        return bool((labels != ignore_index).any())
    return labels.count(ignore_index) != len(labels)  # a list: counted in C, no per-token Python loop


def count_unlabeled(dataset: Sequence, ignore_index: int, max_seq_len: Optional[int]) -> UnlabeledCount:
    """Count the items of ``dataset`` (torchtune SFT or packed: each a dict with ``tokens`` and
    ``labels``) whose labels are all ``ignore_index``. Reads every item once: a torchtune
    ``SFTDataset`` tokenizes each sample as it is read (~1/epoch of the data loading work)."""
    truncated = other = 0
    for index in range(len(dataset)):
        item = dataset[index]
        if _has_label(item["labels"], ignore_index):
            continue
        if max_seq_len is not None and len(item["tokens"]) >= max_seq_len:
            truncated += 1
        else:
            other += 1
    return UnlabeledCount(len(dataset), truncated, other, max_seq_len)
