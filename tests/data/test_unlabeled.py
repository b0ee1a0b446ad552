"""count_unlabeled: the samples that train nothing, counted from the tokenized items once."""

import torch

from torchtune_xgb.data.unlabeled import UnlabeledCount, count_unlabeled

IGNORE = -100


def _item(length: int, labelled: int):
    """``length`` tokens, the last ``labelled`` of them labels."""
    return {"tokens": list(range(length)), "labels": [IGNORE] * (length - labelled) + list(range(labelled))}


def test_samples_without_a_label_are_told_apart_by_whether_max_seq_len_cut_them():
    items = [_item(8, 0), _item(5, 2), _item(8, 1), _item(3, 0), _item(8, 0)]
    assert count_unlabeled(items, IGNORE, max_seq_len=8) == UnlabeledCount(5, truncated=2, other=1, max_seq_len=8)
    assert count_unlabeled(items, IGNORE, max_seq_len=None) == UnlabeledCount(5, truncated=0, other=3, max_seq_len=None)
    packed = [{"tokens": torch.arange(8), "labels": torch.full((8,), IGNORE)}, {"tokens": torch.arange(8), "labels": torch.arange(8)}]
    assert count_unlabeled(packed, IGNORE, max_seq_len=8) == UnlabeledCount(2, truncated=1, other=0, max_seq_len=8)


def test_the_line_says_how_many_samples_lose_their_labels_to_max_seq_len():
    tail = ": they add nothing to the loss or the gradient, and a step made only of them applies no update (counted as skipped_steps)"
    assert UnlabeledCount(40, 0, 0, 64).line() == "dataset: all 40 samples keep label tokens within tokenizer.max_seq_len=64"
    assert UnlabeledCount(40, 3, 0, 64).line() == (
        "dataset: 3 of 40 samples lose all their label tokens to tokenizer.max_seq_len=64 (the prompt fills it)" + tail)
    assert UnlabeledCount(40, 3, 2, 64).line() == (
        "dataset: 3 of 40 samples lose all their label tokens to tokenizer.max_seq_len=64 (the prompt fills it); "
        "2 more have no label token" + tail)
    assert UnlabeledCount(40, 0, 2, 64).line() == "dataset: 2 of 40 samples have no label token" + tail
