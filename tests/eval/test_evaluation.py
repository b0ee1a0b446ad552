"""Exact-match evaluation: known scores from a hand-set model, batching/caching equivalence,
and leaving the model exactly as found."""

import pytest
import torch
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2

from torchtune_xgb.data import make_arithmetic_examples
from torchtune_xgb.eval.exact_match import exact_match, exact_match_details, generate_answers

IM_START, IM_END, OFFSET = 1, 2, 3
VOCAB = OFFSET + 128  # ASCII


class ChatCharTokenizer:
    """ChatML-like, one id per ASCII character: ``<|im_start|>role\\ncontent<|im_end|>\\n``.

    With ``inference=True`` a final empty assistant turn is left open (header only), as
    torchtune's tokenizers do.
    """

    pad_id = 0
    stop_tokens = [IM_END]
    max_seq_len = None

    def encode(self, text):
        return [OFFSET + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i - OFFSET) for i in ids if i >= OFFSET)

    def tokenize_messages(self, messages, add_end_tokens=True):
        tokens, mask = [], []
        for i, m in enumerate(messages):
            t = [IM_START] + self.encode(f"{m.role}\n{m.text_content}")
            if add_end_tokens or i < len(messages) - 1:
                t += [IM_END] + self.encode("\n")
            tokens += t
            mask += [m.masked] * len(t)
        return tokens, mask

    def __call__(self, sample, inference=False):
        tokens, mask = self.tokenize_messages(sample.pop("messages"), add_end_tokens=not inference)
        sample.update(tokens=tokens, mask=mask)
        return sample


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine thread oversubscription
    makes them ~40x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_decoder(num_layers=2, seed=0):
    """A random 2-layer decoder whose greedy replies depend on the prompt."""
    torch.manual_seed(seed)
    model = llama3_2(
        vocab_size=VOCAB, num_layers=num_layers, num_heads=4, num_kv_heads=2, embed_dim=64,
        max_seq_len=256, intermediate_dim=128, tie_word_embeddings=False,
    )
    # The default init lets the residual stream (the current token) dominate, and every reply
    # would be the same string; larger matrices make attention to the prompt matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model


def says_12_model():
    """A real TransformerDecoder hand-set to a bigram table: "\\n" -> "1" -> "2" -> <|im_end|>.

    Attention and MLP write nothing to the residual stream, embeddings are one-hot, so the
    logits at a position depend only on its token: the reply to any ChatML prompt (which ends
    with "assistant\\n") is exactly "12".
    """
    model = llama3_2(
        vocab_size=VOCAB, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=VOCAB + 1,
        max_seq_len=256, intermediate_dim=16, tie_word_embeddings=False,
    )
    enc = ChatCharTokenizer().encode
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(torch.eye(VOCAB, VOCAB + 1))
        for layer in model.layers:
            layer.attn.output_proj.weight.zero_()
            layer.mlp.w2.weight.zero_()
        out = torch.zeros(VOCAB, VOCAB + 1)
        for prev, nxt in ((enc("\n")[0], enc("1")[0]), (enc("1")[0], enc("2")[0]), (enc("2")[0], IM_END)):
            out[nxt, prev] = 1.0
        model.output.weight.copy_(out)
    return model


def prompts_of(examples):
    return [{"prompt_messages": e["messages"][:-1], "answer": e["answer"]} for e in examples]


def mixed_length_examples():
    """Prompts of many lengths (1- and 2-digit operands, system turns of varying length) so
    that batches need padding."""
    ex = prompts_of(
        make_arithmetic_examples(6, seed=1, split="eval", digits=1)
        + make_arithmetic_examples(9, seed=2, split="eval", digits=2)
    )
    for i, e in enumerate(ex[::2]):
        e["prompt_messages"] = [{"role": "system", "content": "Be brief. " * i}] + e["prompt_messages"]
    return ex


def naive_greedy(model, tokenizer, example, max_new_tokens):
    """Reference: one prompt, full recompute, default causal mask, no padding, no cache."""
    from torchtune_xgb.eval.exact_match import _to_messages

    tokens = tokenizer({"messages": _to_messages(example["prompt_messages"])}, inference=True)["tokens"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([tokens + out]))[0, -1].argmax())
            if nxt in tokenizer.stop_tokens:
                break
            out.append(nxt)
    return tokenizer.decode(out).strip()


def test_exact_match_known_fraction():
    pool = make_arithmetic_examples(2000, seed=0, split="train")
    twelves = [e for e in pool if e["answer"] == "12"][:5]
    others = [e for e in pool if e["answer"] != "12"][:15]
    assert len(twelves) == 5
    examples = prompts_of(others[:7] + twelves + others[7:])
    expected = sum(e["answer"] == "12" for e in examples) / len(examples)  # 0.25

    model, tok = says_12_model(), ChatCharTokenizer()
    for batch_size in (1, 4, 16):
        assert exact_match(model, tok, examples, batch_size=batch_size) == pytest.approx(expected)
    score, records = exact_match_details(model, tok, examples)
    assert score == pytest.approx(0.25)
    assert {r["prediction"] for r in records} == {"12"}
    assert [r["correct"] for r in records] == [e["answer"] == "12" for e in examples]


def test_scoring_is_strict_but_strips_whitespace():
    model, tok = says_12_model(), ChatCharTokenizer()
    q = [{"role": "user", "content": "?"}]
    examples = [{"prompt_messages": q, "answer": a} for a in ("12", " 12\n", "12.", "1", "120")]
    _, records = exact_match_details(model, tok, examples)
    assert [r["correct"] for r in records] == [True, True, False, False, False]


def test_max_new_tokens_truncates():
    model, tok = says_12_model(), ChatCharTokenizer()
    examples = [{"prompt_messages": [{"role": "user", "content": "hi"}], "answer": "1"}]
    assert generate_answers(model, tok, examples, max_new_tokens=1) == ["1"]


def _counting_forwards(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("other_rank_done_after,forwards", [(5, 5), (None, 8), (1, 3)])
def test_decoding_stops_at_the_token_where_every_rank_is_done(other_rank_done_after, forwards):
    """Under FSDP every rank decodes the same batch and each forward pass is a collective: ranks
    must stop at the same token. Simulated: this rank's replies ("12" + <|im_end|>) end at token 3;
    the reduction also asks another rank, done after ``other_rank_done_after`` tokens (None: never,
    until max_new_tokens). Decoding goes on, one decision per token, until both are done; the
    extra tokens do not change the replies."""
    model, tok = says_12_model(), ChatCharTokenizer()
    calls = _counting_forwards(model)
    examples = [{"prompt_messages": [{"role": "user", "content": q}], "answer": "12"} for q in ("hi", "a longer one")]
    asked = []

    def all_ranks_done(done):
        asked.append(done)
        return done and other_rank_done_after is not None and len(asked) >= other_rank_done_after

    replies = generate_answers(model, tok, examples, max_new_tokens=8, all_ranks_done=all_ranks_done)
    assert replies == ["12", "12"]
    assert len(calls) == len(asked) == forwards  # one shared decision per generated token
    assert asked == [False, False] + [True] * (forwards - 2)  # this rank alone would stop at token 3
    calls.clear()
    assert generate_answers(model, tok, examples, max_new_tokens=8) == ["12", "12"] and len(calls) == 3  # one process


def test_the_fsdp_recipe_decodes_until_every_rank_is_done(monkeypatch):
    """The distributed recipe's evaluation reduces the done flag over the ranks (its minimum),
    once per generated token. Simulated ranks: the all-reduce combines this rank's flag with
    another rank that is done only from token 5 on."""
    import torch.distributed as dist
    import xgblora_finetune_distributed as worker
    from omegaconf import OmegaConf

    from torchtune_xgb.eval.config import parse_eval_config

    recipe = object.__new__(worker.XGBLoRAFinetuneRecipeDistributed)
    recipe._model, recipe._tokenizer, recipe._device = says_12_model(), ChatCharTokenizer(), torch.device("cpu")
    recipe._eval_examples = [{"prompt_messages": [{"role": "user", "content": "hi"}], "answer": "12"}]
    recipe._eval = parse_eval_config(OmegaConf.create({"eval": {"examples": {"_component_": "x"}, "max_new_tokens": 8}}))
    calls = _counting_forwards(recipe._model)
    reduced = []

    def all_reduce(tensor, op=dist.ReduceOp.SUM):
        other = torch.full_like(tensor, int(len(reduced) >= 4))  # the other rank's flag at this token
        reduced.append(op)
        combine = torch.minimum if op == dist.ReduceOp.MIN else torch.maximum if op == dist.ReduceOp.MAX else torch.add
        tensor.copy_(combine(tensor, other))

    monkeypatch.setattr(worker.dist, "all_reduce", all_reduce)
    assert recipe._exact_match() == 1.0
    assert len(calls) == len(reduced) == 5 and all(op == dist.ReduceOp.MIN for op in reduced)


def test_left_padding_and_cache_do_not_change_predictions():
    model, tok = tiny_decoder(), ChatCharTokenizer()
    examples = mixed_length_examples()
    lengths = {sum(len(m["content"]) for m in e["prompt_messages"]) for e in examples}
    assert len(lengths) >= 5  # padding really happens
    reference = [naive_greedy(model, tok, e, 6) for e in examples]
    assert len(set(reference)) > 3  # a random model, but not a degenerate one
    for batch_size in (1, 4, 64):
        assert generate_answers(model, tok, examples, max_new_tokens=6, batch_size=batch_size) == reference
    # A model whose caches were set up by someone else is decoded without them, caches kept.
    model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=128)
    assert generate_answers(model, tok, examples, max_new_tokens=6, batch_size=5) == reference
    assert model.caches_are_setup() and model.caches_are_enabled()


def test_tied_output_projection_is_restored():
    """With tied embeddings ``output`` is a plain TiedLinear, swapped for the duration only."""
    torch.manual_seed(1)
    model = llama3_2(vocab_size=VOCAB, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=64,
                     max_seq_len=256, intermediate_dim=128, tie_word_embeddings=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    tok, examples = ChatCharTokenizer(), mixed_length_examples()[:6]
    output, keys = model.output, list(model.state_dict())
    reference = [naive_greedy(model, tok, e, 5) for e in examples]
    assert generate_answers(model, tok, examples, max_new_tokens=5, batch_size=3) == reference
    assert model.output is output and "output" not in model._modules
    assert list(model.state_dict()) == keys


def test_model_left_exactly_as_found():
    torch.manual_seed(0)
    model = lora_llama3_2(
        lora_attn_modules=["q_proj", "v_proj"], vocab_size=VOCAB, num_layers=2, num_heads=4,
        num_kv_heads=2, embed_dim=64, max_seq_len=256, intermediate_dim=128,
        lora_rank=4, lora_alpha=8, lora_dropout=0.5, tie_word_embeddings=False,
    )
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    model.train()
    model.layers[1].mlp.eval()  # mixed modes must come back as they were
    model.set_num_output_chunks(4)
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    tok = ChatCharTokenizer()
    examples = mixed_length_examples()

    first = generate_answers(model, tok, examples, max_new_tokens=4)
    # Dropout 0.5 would make replies random if eval mode were not switched on.
    assert generate_answers(model, tok, examples, max_new_tokens=4) == first

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())
    assert not model.caches_are_setup() and model.decoder_max_cache_seq_len is None
    assert model.num_output_chunks == 4
    assert type(model.output).__name__ == "LoRALinear" or isinstance(model.output, torch.nn.Linear)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_clear_errors():
    model, tok = says_12_model(), ChatCharTokenizer()
    with pytest.raises(ValueError, match="no examples"):
        exact_match(model, tok, [])

    class NoInferenceTokenizer(ChatCharTokenizer):
        def __call__(self, sample, inference=False):
            return super().__call__(sample, inference=False)

    examples = [{"prompt_messages": [{"role": "user", "content": "x"}], "answer": "1"}]
    with pytest.raises(ValueError, match="inference=True"):
        exact_match(model, NoInferenceTokenizer(), examples)
