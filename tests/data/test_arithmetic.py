"""The generated arithmetic task: determinism, disjoint splits, files, torchtune's builder."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from torchtune_xgb.data import (
    arithmetic_dataset,
    load_eval_examples,
    make_arithmetic_examples,
    write_arithmetic_dataset,
)
from torchtune_xgb.data.arithmetic import MANIFEST, _candidates

QUESTION = re.compile(r"^What is (\d+) ([+-]) (\d+)\? Answer with the number only\.$")


class CharTokenizer:
    """Minimal torchtune ModelTokenizer: one id per character, ChatML-like turn markers."""

    pad_id, bos_id, eos_id = 0, 1, 2
    stop_tokens = [2]
    max_seq_len = None

    def encode(self, text, add_bos=False, add_eos=False):
        return [3 + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)

    def tokenize_messages(self, messages, add_end_tokens=True):
        tokens, mask = [], []
        for m in messages:
            t = [self.bos_id] + self.encode(f"{m.role}\n{m.text_content}") + [self.eos_id]
            tokens += t
            mask += [m.masked] * len(t)
        return tokens, mask

    def __call__(self, sample, inference=False):
        tokens, mask = self.tokenize_messages(sample.pop("messages"))
        sample.update(tokens=tokens, mask=mask)
        return sample


def test_golden_first_examples_seed0():
    train = make_arithmetic_examples(2, seed=0, split="train")
    assert [(e["question"], e["answer"]) for e in train] == [
        ("What is 52 + 68? Answer with the number only.", "120"),
        ("What is 99 - 38? Answer with the number only.", "61"),
    ]
    assert train[0]["messages"] == [
        {"role": "user", "content": "What is 52 + 68? Answer with the number only."},
        {"role": "assistant", "content": "120"},
    ]
    ev = make_arithmetic_examples(2, seed=0, split="eval")
    assert [(e["question"], e["answer"]) for e in ev] == [
        ("What is 53 - 16? Answer with the number only.", "37"),
        ("What is 46 + 92? Answer with the number only.", "138"),
    ]


def test_deterministic_and_seed_dependent():
    a = make_arithmetic_examples(50, seed=3, split="train")
    assert a == make_arithmetic_examples(50, seed=3, split="train")
    assert a != make_arithmetic_examples(50, seed=4, split="train")
    ev = make_arithmetic_examples(20, seed=3, split="eval")
    assert ev == make_arithmetic_examples(20, seed=3, split="eval")


def test_smaller_n_is_a_prefix():
    # So that changing n_eval (or n_train) only truncates or extends the set.
    for split in ("train", "eval"):
        big = make_arithmetic_examples(600, seed=0, split=split)
        for n in (1, 10, 100, 300):
            assert make_arithmetic_examples(n, seed=0, split=split) == big[:n]


def test_answers_are_correct_and_nonnegative():
    ops_seen = set()
    for e in make_arithmetic_examples(500, seed=1, split="train"):
        a, op, b = QUESTION.match(e["question"]).groups()
        a, b = int(a), int(b)
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert e["answer"] == str(a + b if op == "+" else a - b)
        assert int(e["answer"]) >= 0
        ops_seen.add(op)
    assert ops_seen == {"+", "-"}


def test_splits_disjoint_and_without_duplicates():
    pool_train = _candidates("train", ("+", "-"), 2)
    pool_eval = _candidates("eval", ("+", "-"), 2)
    assert len(pool_train) + len(pool_eval) == 90 * 90 + 90 * 91 // 2  # every question owned once
    assert not set(pool_train) & set(pool_eval)
    # Whole splits drawn with different seeds still never share a question.
    train_q = {e["question"] for e in make_arithmetic_examples(len(pool_train), seed=0, split="train")}
    for seed in (0, 1, 7):
        eval_q = [e["question"] for e in make_arithmetic_examples(len(pool_eval), seed=seed, split="eval")]
        assert len(set(eval_q)) == len(eval_q)
        assert not train_q & set(eval_q)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        make_arithmetic_examples(1, split="test")
    with pytest.raises(ValueError, match="outside"):
        make_arithmetic_examples(10**6, split="eval")
    with pytest.raises(ValueError, match="ops"):
        make_arithmetic_examples(1, ops=("*",))


def test_write_files_json_lines_and_idempotent(tmp_path):
    paths = write_arithmetic_dataset(tmp_path, n_train=30, n_eval=10, seed=0)
    assert set(paths) == {"train", "eval"}
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 30
    assert rows[0] == {
        "messages": make_arithmetic_examples(1, seed=0, split="train")[0]["messages"],
        "answer": "120",
    }
    assert len(paths["eval"].read_text().splitlines()) == 10

    # Same content -> no rewrite (an old mtime survives); different content -> rewritten.
    for p in paths.values():
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    write_arithmetic_dataset(tmp_path, n_train=30, n_eval=10, seed=0)
    assert all(p.stat().st_mtime_ns == 1_000_000_000 for p in paths.values())
    write_arithmetic_dataset(tmp_path, n_train=31, n_eval=10, seed=0)
    assert paths["train"].stat().st_mtime_ns != 1_000_000_000
    assert len(paths["train"].read_text().splitlines()) == 31
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != MANIFEST] == []  # no temp files left


def test_default_dir_is_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHTUNE_XGB_CACHE", str(tmp_path))
    paths = write_arithmetic_dataset(n_train=5, n_eval=5)
    assert paths["train"] == tmp_path.resolve() / "arithmetic" / "train.json"


def test_load_eval_examples_match_the_file(tmp_path):
    examples = load_eval_examples("eval", n_eval=12, data_dir=tmp_path)
    expected = make_arithmetic_examples(12, seed=0, split="eval")
    assert [e["answer"] for e in examples] == [e["answer"] for e in expected]
    assert examples[0]["prompt_messages"] == [{"role": "user", "content": expected[0]["question"]}]


def test_torchtune_builder_reads_the_files(tmp_path):
    tok = CharTokenizer()
    kw = dict(n_train=20, n_eval=6, data_dir=tmp_path / "data", cache_dir=str(tmp_path / "hf"))
    train = arithmetic_dataset(tok, split="train", **kw)
    ev = arithmetic_dataset(tok, split="eval", **kw)
    assert (len(train), len(ev)) == (20, 6)
    item = train[0]
    assert len(item["tokens"]) == len(item["labels"])
    # train_on_input=False: only the assistant turn is supervised, and it holds the answer.
    supervised = [t for t in item["labels"] if t >= 0]
    assert tok.decode(supervised) == "assistant\n120"
    assert tok.decode(item["tokens"]).startswith("user\nWhat is 52 + 68?")


def test_builder_and_loader_write_only_their_split(tmp_path):
    """A train builder and an eval loader with different sizes must not rewrite each other's file."""
    write_arithmetic_dataset(tmp_path, n_train=10, n_eval=7)
    for name in ("train.json", "eval.json"):
        os.utime(tmp_path / name, ns=(1_000_000_000, 1_000_000_000))
    load_eval_examples("eval", n_train=99, n_eval=7, data_dir=tmp_path)
    arithmetic_dataset(CharTokenizer(), split="train", n_train=10, n_eval=99, data_dir=tmp_path,
                       cache_dir=str(tmp_path / "hf"))
    assert all((tmp_path / n).stat().st_mtime_ns == 1_000_000_000 for n in ("train.json", "eval.json"))


def test_builder_works_offline(tmp_path):
    """Local JSON through torchtune + datasets with the Hub forced offline (fresh interpreter,
    because datasets reads the offline flags at import time)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{repo!r}]
        from tests.data.test_arithmetic import CharTokenizer
        from torchtune_xgb.data import arithmetic_dataset
        ds = arithmetic_dataset(CharTokenizer(), split="eval", n_train=8, n_eval=4,
                                data_dir={str(tmp_path / "data")!r}, cache_dir={str(tmp_path / "hf")!r})
        print("ROWS", len(ds))
        """
    )
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ROWS 4" in out.stdout
