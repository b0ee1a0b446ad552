"""Exact-match evaluation of a torchtune decoder on chat prompts with known answers.

Greedy decoding of a batch of left-padded prompts, with an explicit padding-aware causal mask
and right-shifted positions (torchtune's own helpers), and a temporary KV cache when the model
has none. The model is left exactly as found: every module's train/eval flag, no KV caches
added or removed, no gradients, ``num_output_chunks`` unchanged, global RNG untouched.

Why not ``torchtune.generation.generate``: it derives the padding mask from ``prompt != pad_id``,
which silently masks real prompt tokens whenever the pad id also occurs in prompts (some ChatML
tokenizers use ``<|im_end|>`` as pad), and its "greedy" is sampling at a tiny temperature.
Here the mask comes from the true prompt lengths and decoding is a plain ``argmax``.

Scoring: the completion up to the first stop token is decoded, and prediction and answer are
compared with ``==`` after the same normaliser (``eval.normalize``, eval/normalize.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torchtune.data import Message
from torchtune.generation import (
    get_causal_mask_from_padding_mask,
    get_position_ids_from_padding_mask,
)
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import disable_kv_cache, local_kv_cache

from torchtune_xgb.eval.normalize import normalize_answer


def _to_messages(prompt_messages: Sequence[Message | Mapping[str, Any]]) -> list[Message]:
    """Prompt turns as torchtune Messages, plus the empty assistant turn that asks for a reply."""
    messages = [
        m if isinstance(m, Message) else Message(role=m["role"], content=m["content"], masked=True)
        for m in prompt_messages
    ]
    # torchtune's generate recipe does the same: with inference=True the tokenizer emits the
    # assistant header and no end-of-turn token, so the model continues with the reply.
    messages.append(Message(role="assistant", content=""))
    return messages


def _tokenize_prompt(tokenizer, prompt_messages, stop_tokens: set[int]) -> list[int]:
    tokens = list(tokenizer({"messages": _to_messages(prompt_messages)}, inference=True)["tokens"])
    if not tokens:
        raise ValueError("the tokenizer returned no tokens for a prompt")
    # A tokenizer that ignores inference=True closes the assistant turn (e.g. "<|im_end|>\n"),
    # and the model would then start a new turn instead of answering: fail loudly instead.
    if stop_tokens.intersection(tokens[-2:]):
        raise ValueError("the tokenized prompt ends with a stop token; the tokenizer must honour inference=True")
    return tokens


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    emb = getattr(model, "tok_embeddings", None)
    if emb is not None and hasattr(emb, "weight"):
        return emb.weight.device, emb.weight.dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ValueError("the model has no floating-point parameters")


@contextlib.contextmanager
def _inference_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, unchunked last-position logits for the duration; all restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    chunks = vars(model).get("num_output_chunks")
    try:
        model.eval()
        if chunks:
            model.num_output_chunks = 0  # training may have set chunked output (a list of tensors)
        with torch.no_grad(), _last_position_logits(model):
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        if chunks:
            model.num_output_chunks = chunks


@contextlib.contextmanager
def _kv_cache_for(model: nn.Module, batch_size: int, total_len: int, device, dtype) -> Iterator[bool]:
    """Yield whether decoding may use a KV cache; a cache made here is deleted on exit.

    A model that already has caches (someone else's) is decoded without them, caches untouched.
    """
    if not hasattr(model, "caches_are_setup"):
        yield False
    elif model.caches_are_setup():
        with disable_kv_cache(model) if model.caches_are_enabled() else contextlib.nullcontext():
            yield False
    else:
        names = ("decoder_max_cache_seq_len", "encoder_max_cache_seq_len")
        saved = {k: vars(model)[k] for k in names if k in vars(model)}
        try:
            with local_kv_cache(
                model, batch_size=batch_size, device=device, dtype=dtype, decoder_max_seq_len=total_len
            ):
                yield True
        finally:
            for k, v in saved.items():
                setattr(model, k, v)  # local_kv_cache leaves these set; put back what was there


class _LastPosition(nn.Module):
    """Wraps the output projection to project only the last position."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h[:, -1:])


@contextlib.contextmanager
def _last_position_logits(model: nn.Module) -> Iterator[None]:
    """Make the decoder project only its last position to the vocabulary, for the duration.

    Decoding needs one row of logits per step, but ``TransformerDecoder.forward`` projects every
    prompt position: for a 49k vocabulary that is ~20% of a 135M model's prompt compute and a
    [batch, prompt, vocab] float tensor. ``output`` is an ``nn.Module`` (Linear, LoRALinear) or,
    with tied embeddings, a plain ``TiedLinear`` callable; the stand-in has the same kind so that
    putting the original back goes through the same attribute slot.
    """
    # Only a TransformerDecoder's own attribute (not one a wrapper such as torch.compile's
    # forwards, or restoring it would graft a new child onto the wrapper).
    orig = model._modules.get("output") if "output" in model._modules else vars(model).get("output")
    if not isinstance(model, TransformerDecoder) or orig is None:
        yield
        return
    model.output = _LastPosition(orig) if isinstance(orig, nn.Module) else (lambda h: orig(h[:, -1:]))
    try:
        yield
    finally:
        model.output = orig


def _logits(out) -> torch.Tensor:
    # With output_hidden_states the decoder returns [*hidden, logits].
    return out[-1] if isinstance(out, list) else out


def _greedy_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_tokens: set[int],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    all_ranks_done: Callable[[bool], bool],
) -> list[list[int]]:
    """Greedy continuations of left-padded ``prompts``, each cut before its first stop token.
    Stops when ``all_ranks_done`` says so (see :func:`generate_answers`)."""
    bsz, plen = len(prompts), max(len(p) for p in prompts)
    total = plen + max_new_tokens
    tokens = torch.full((bsz, total), pad_id, dtype=torch.long, device=device)
    valid = torch.ones((bsz, total), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p) : plen] = torch.tensor(p, dtype=torch.long)
        valid[i, : plen - len(p)] = False
    # The mask comes from the true lengths, not from tokens == pad_id (see module docstring).
    masks = get_causal_mask_from_padding_mask(valid, target_seq_len=total)  # [b, total, total]
    positions = get_position_ids_from_padding_mask(valid)  # [b, total], 0 at each first real token
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
    with _kv_cache_for(model, bsz, total, device, dtype) as cached:
        for cur in range(plen, total):
            if cached:  # the whole prompt first, then only the newest token; keys span the cache
                lo = 0 if cur == plen else cur - 1
                x, mask, pos = tokens[:, lo:cur], masks[:, lo:cur, :], positions[:, lo:cur]
            else:  # no cache: recompute the whole prefix each step
                x, mask, pos = tokens[:, :cur], masks[:, :cur, :cur], positions[:, :cur]
            logits = _logits(model(x, mask=mask, input_pos=pos))[:, -1]
            nxt = logits.argmax(dim=-1)
            tokens[:, cur] = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            done |= torch.isin(nxt, stop)
            if all_ranks_done(bool(done.all())):  # one decision per token, shared by all ranks
                break
    out = []
    for row in tokens[:, plen:].tolist():
        ids = []
        for t in row:
            if t in stop_tokens:
                break
            ids.append(t)
        out.append(ids)
    return out


def generate_answers(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 8,
    batch_size: int = 16,
    device: Optional[str | torch.device] = None,
    normalize: str = "strip",
    all_ranks_done: Optional[Callable[[bool], bool]] = None,
) -> list[str]:
    """Greedy replies of ``model`` to each example's prompt.

    Args:
        model: a torchtune ``TransformerDecoder`` (LoRA or not, train or eval mode), already on
            its device; it is left exactly as found.
        tokenizer: a torchtune ``ModelTokenizer`` with ``stop_tokens`` and ``decode``.
        examples: dicts with ``prompt_messages``, a list of ``{"role", "content"}`` dicts or
            torchtune ``Message``s (as returned by ``load_eval_examples``).
        max_new_tokens: cap on generated tokens per reply.
        batch_size: prompts decoded together (left-padded).
        device: where the token tensors go; default: the device of the model's parameters.
        normalize: ``strip`` | ``none`` | ``lower`` | ``number`` (see the module docstring).
        all_ranks_done: for a model sharded over processes (FSDP2), where every rank decodes the
            same batches and each forward pass is a collective: called once per generated token
            with whether this rank's replies have all ended, it returns whether every rank's
            have (e.g. an all-reduce), so that all ranks stop at the same token; ranks whose
            logits differ in the last bit would otherwise stop apart and leave one waiting in a
            forward pass forever. Default: this process's own answer.

    Returns:
        One decoded reply per example, in order, cut before the first stop token and passed
        through :func:`normalize_answer` with ``normalize``.
    """
    normalize_answer("", normalize)  # an unknown normaliser fails before any decoding
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    stop_tokens = set(int(t) for t in (getattr(tokenizer, "stop_tokens", None) or []))
    if not stop_tokens:
        raise ValueError("tokenizer.stop_tokens is empty: replies would never end")
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)  # any id will do: padding is masked out
    model_device, dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device

    prompts = [_tokenize_prompt(tokenizer, ex["prompt_messages"], stop_tokens) for ex in examples]
    # Batch prompts of similar length together to keep padding (wasted compute) small.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[Optional[str]] = [None] * len(prompts)
    with _inference_state(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [prompts[i] for i in idx]
            outs = _greedy_batch(model, batch, max_new_tokens, stop_tokens, pad_id, device, dtype, all_ranks_done or bool)
            for i, ids in zip(idx, outs):
                replies[i] = normalize_answer(tokenizer.decode(ids), normalize)
    return replies  # type: ignore[return-value]


def exact_match_details(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 8,
    batch_size: int = 16,
    device: Optional[str | torch.device] = None,
    normalize: str = "strip",
    all_ranks_done: Optional[Callable[[bool], bool]] = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Like :func:`exact_match`, also returning per-example records.

    Returns:
        ``(fraction, records)`` where each record is ``{"prompt_messages", "answer",
        "prediction", "correct"}`` in the order of ``examples``.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    preds = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size, device, normalize, all_ranks_done)
    records = []
    for ex, pred in zip(examples, preds):
        correct = pred == normalize_answer(str(ex["answer"]), normalize)
        records.append(
            {"prompt_messages": ex["prompt_messages"], "answer": ex["answer"], "prediction": pred, "correct": correct}
        )
    return sum(r["correct"] for r in records) / len(records), records


def exact_match(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 8,
    batch_size: int = 16,
    device: Optional[str | torch.device] = None,
    normalize: str = "strip",
    all_ranks_done: Optional[Callable[[bool], bool]] = None,
) -> float:
    """Fraction of ``examples`` whose greedy reply equals ``answer`` after the same normaliser
    (default: whitespace stripped).

    Args:
        model, tokenizer, max_new_tokens, batch_size, device, normalize, all_ranks_done: as in
            :func:`generate_answers`.
        examples: dicts with ``prompt_messages`` and ``answer`` (see ``load_eval_examples``).

    Returns:
        A float in [0, 1]. Raises ``ValueError`` on an empty ``examples``.
    """
    return exact_match_details(model, tokenizer, examples, max_new_tokens, batch_size, device, normalize, all_ranks_done)[0]
