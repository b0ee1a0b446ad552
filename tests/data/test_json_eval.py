"""Evaluation on the user's own file, the `eval.normalize` scorers, and generated data never
overwriting a user's file. In process, table-driven."""

import hashlib
import json

import pytest
from omegaconf import OmegaConf

from tests.eval.test_evaluation import ChatCharTokenizer, says_12_model
from torchtune_xgb.data import json_eval_examples, load_eval_examples
from torchtune_xgb.data.arithmetic import MANIFEST
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.eval.exact_match import exact_match
from torchtune_xgb.eval.normalize import normalize_answer
from torchtune_xgb.eval.validation import validate_eval_config

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_chat_records_last_assistant_turn_is_the_answer(tmp_path):
    path = _jsonl(tmp_path / "eval.jsonl", CHAT)
    digest = _sha(path)
    assert json_eval_examples(str(path)) == [
        {"prompt_messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": "4"},
        {"prompt_messages": [{"role": "user", "content": "Capital of France?"}], "answer": "Paris"},
    ]
    assert _sha(path) == digest


def test_columns_from_a_json_array_with_system_prompt_and_limit(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"q": "1+1?", "a": 2}, {"q": "3+4?", "a": 7}, {"q": "x", "a": "y"}]))
    got = json_eval_examples(str(path), input_column="q", output_column="a", system_prompt="Numbers only.", max_examples=2)
    assert got == [
        {"prompt_messages": [{"role": "system", "content": "Numbers only."}, {"role": "user", "content": "1+1?"}], "answer": "2"},
        {"prompt_messages": [{"role": "system", "content": "Numbers only."}, {"role": "user", "content": "3+4?"}], "answer": "7"},
    ]


@pytest.mark.parametrize(
    "content,kwargs,key",
    [
        (None, {}, "eval.examples.path"),  # no file
        ("{not json\n", {}, "eval.examples.path"),
        ("[]", {}, "eval.examples.path"),
        ('{"q": "1", "b": "2"}\n', {"input_column": "q", "output_column": "a"}, "eval.examples.output_column"),
        ('{"x": "1", "a": "2"}\n', {"input_column": "q", "output_column": "a"}, "eval.examples.input_column"),
        ('{"q": "1", "a": "2"}\n', {"input_column": "q"}, "eval.examples.output_column"),
        ('{"q": "1", "a": "2"}\n', {}, "eval.examples.messages_column"),  # column records, no columns set
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', {}, "eval.examples.messages_column"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}\n', {}, "eval.examples.messages_column"),
    ],
)
def test_bad_file_or_columns_name_the_key(tmp_path, content, kwargs, key):
    path = tmp_path / "eval.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        json_eval_examples(str(path), **kwargs)
    assert str(err.value).startswith(f"{key}:") and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"q": "1", "a": "2"}\n\n{"q": "3", "a": "4"}\n{"q": "5", a: "6"}\n', "is not JSON lines (Expecting property name enclosed in double quotes, line 4)"),
        ('\n[\n {"q": "1", "a": "2"},\n {"q": "3" "a": "4"}\n]\n', "is not JSON (Expecting ',' delimiter, line 4)"),
    ],
)
def test_a_malformed_file_names_the_line_of_the_file(tmp_path, content, expected):
    path = tmp_path / "eval.jsonl"
    path.write_text(content)  # line 4 is the broken one in both (blank lines count)
    with pytest.raises(ConfigError) as err:
        json_eval_examples(str(path), input_column="q", output_column="a")
    assert str(err.value) == f"eval.examples.path: {path} {expected}"


@pytest.mark.parametrize(
    "normalize,text,expected",
    [
        ("none", " 85 ", " 85 "),
        ("strip", " 85 \n", "85"),
        ("lower", " Paris ", "paris"),
        ("number", "The answer is 85.", "85"),
        ("number", "85.0", "85"),
        ("number", "-0", "0"),
        ("number", "1,234.50 apples", "1234.5"),
        ("number", "1,2,3", "1"),
        ("number", " no digits ", "no digits"),
    ],
)
def test_normalizers(normalize, text, expected):
    assert normalize_answer(text, normalize) == expected


@pytest.mark.parametrize("normalize,score", [("strip", 0.25), ("none", 0.25), ("lower", 0.25), ("number", 0.75)])
def test_exact_match_scores_with_the_configured_normalizer(normalize, score):
    # the hand-set model replies exactly "12" to every prompt
    prompts = [{"prompt_messages": [{"role": "user", "content": f"q{i}"}]} for i in range(4)]
    answers = ["12", "12.0", "twelve? no: 12", "13"]
    examples = [dict(p, answer=a) for p, a in zip(prompts, answers)]
    got = exact_match(says_12_model(), ChatCharTokenizer(), examples, max_new_tokens=4, normalize=normalize)
    assert got == pytest.approx(score)


def test_generated_task_never_overwrites_a_users_file(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    mine = _jsonl(user / "eval.json", CHAT)
    digest = _sha(mine)
    with pytest.raises(ConfigError) as err:
        load_eval_examples(data_dir=str(user), n_eval=8)
    assert str(err.value).startswith("data_dir:") and str(mine) in str(err.value)
    assert _sha(mine) == digest and sorted(p.name for p in user.iterdir()) == ["eval.json"]
    # caught by the config check too, before any weights load, writing nothing
    cfg = OmegaConf.create({"eval": {"examples": {"_component_": "torchtune_xgb.data.load_eval_examples",
                                                   "split": "eval", "n_eval": 8, "data_dir": str(user)}}})
    with pytest.raises(ConfigError, match="^data_dir:"):
        validate_eval_config(cfg)
    assert sorted(p.name for p in user.iterdir()) == ["eval.json"]


def test_generated_task_replaces_its_own_file(tmp_path):
    ours = tmp_path / "gen"
    first = load_eval_examples(data_dir=str(ours), n_eval=8)
    assert (ours / MANIFEST).is_file()
    second = load_eval_examples(data_dir=str(ours), n_eval=4)  # other size: rewritten, it is ours
    assert second == first[:4]


def test_config_check_reads_the_users_file_early(tmp_path):
    cfg = OmegaConf.create({"eval": {"examples": {"_component_": "torchtune_xgb.data.json_eval_examples",
                                                   "path": str(tmp_path / "missing.jsonl")}}})
    with pytest.raises(ConfigError, match="^eval.examples.path: file not found"):
        validate_eval_config(cfg)
    with pytest.raises(ConfigError, match="^eval.normalize:"):
        validate_eval_config(OmegaConf.create({"eval": {"normalize": "fuzzy"}}))
