"""A ChatML tokenizer for torchtune over a Hugging Face ``tokenizer.json``.

ChatML renders every message as ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (SmolLM2, Qwen,
...). Use in YAML as::

    tokenizer:
      _component_: torchtune_xgb.models.chatml.smollm2_tokenizer
      path: ${xgb_cache:smollm2-135m-instruct}/tokenizer.json
      max_seq_len: 512

Built directly on ``tokenizers.Tokenizer`` rather than torchtune 0.6.1's
``HuggingFaceBaseTokenizer``: that class insists on a ``tokenizer_config.json`` or
``generation_config.json`` only to look up BOS/EOS, which ChatML fixes by token name, and its
``decode`` cannot keep special tokens. The token ids are the ones HF's own tokenizer (and its
``apply_chat_template``) produce for the same conversation.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple, Union

from tokenizers import Tokenizer
from torchtune.data import ChatMLTemplate, Message, PromptTemplateInterface, truncate
from torchtune.data._prompt_templates import _get_prompt_template
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# The system prompt SmolLM2-Instruct's HF chat template inserts when a conversation has none.
# Not added unless asked for (``system_prompt=``), like torchtune's other tokenizers.
SMOLLM2_DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# torchtune roles -> ChatML role names. torchtune calls tool results "ipython"; ChatML models
# (Qwen2.5, Hermes) call that turn "tool".
_ROLE_NAMES = {"system": "system", "user": "user", "assistant": "assistant", "ipython": "tool", "tool": "tool"}


class ChatMLTokenizer(ModelTokenizer, Transform):
    """ChatML ``ModelTokenizer``/``Transform`` over a byte-level BPE ``tokenizer.json``.

    Args:
        path: the ``tokenizer.json``; it must contain ``<|endoftext|>``, ``<|im_start|>`` and
            ``<|im_end|>`` as special tokens.
        max_seq_len: truncate ``tokenize_messages`` output to this many tokens (None: never).
        prompt_template: optional torchtune prompt template applied to the messages first (not
            ``ChatMLTemplate``: this tokenizer already writes ChatML).
        truncation_type: ``"right"`` drops the end (and, when end tokens were requested, makes
            the last kept token ``<|im_end|>``); ``"left"`` drops the beginning.
        system_prompt: if given, prepended (masked) as a system message to conversations that
            do not start with one, as SmolLM2's HF chat template does with
            :data:`SMOLLM2_DEFAULT_SYSTEM_PROMPT`.
        add_bos_token: whether ``encode(add_bos=True)`` prepends ``bos_id``. False by default:
            SmolLM2 never prepends a BOS (its GGUF has ``add_bos_token = false``).

    Token ids: ``eos_id`` is ``<|im_end|>`` (ends a turn, what generation stops on),
    ``bos_id`` is ``<|im_start|>`` (what HF's config calls bos; not prepended by default),
    ``pad_id`` is ``<|endoftext|>`` (distinct from eos, so padding is never mistaken for an
    end of turn), ``stop_tokens`` are ``[<|im_end|>, <|endoftext|>]``.
    """

    def __init__(
        self,
        path: str,
        max_seq_len: Optional[int] = None,
        prompt_template: Optional[PromptTemplateInterface] = None,
        truncation_type: str = "right",
        system_prompt: Optional[str] = None,
        add_bos_token: bool = False,
    ):
        if truncation_type not in ("right", "left"):
            raise ValueError(f"truncation_type must be 'right' or 'left', got {truncation_type!r}")
        if isinstance(prompt_template, ChatMLTemplate):
            raise ValueError("ChatMLTokenizer already writes ChatML; ChatMLTemplate would wrap messages twice")
        self.path = str(path)
        self.tokenizer = Tokenizer.from_file(self.path)
        ids = {}
        for token in (ENDOFTEXT, IM_START, IM_END):
            ids[token] = self.tokenizer.token_to_id(token)
            if ids[token] is None:
                raise ValueError(f"{self.path}: tokenizer has no {token} token")
        # ModelTokenizer protocol attribute: every special token of the tokenizer.json.
        self.special_tokens = {
            tok.content: idx for idx, tok in self.tokenizer.get_added_tokens_decoder().items() if tok.special
        }
        self.endoftext_id = ids[ENDOFTEXT]
        self.im_start_id = ids[IM_START]
        self.im_end_id = ids[IM_END]
        self.max_seq_len = max_seq_len
        self.prompt_template = prompt_template
        self.truncation_type = truncation_type
        self.system_prompt = system_prompt
        self.add_bos_token = add_bos_token
        self._newline = self._encode_plain("\n")

    @property
    def bos_id(self) -> int:
        return self.im_start_id

    @property
    def eos_id(self) -> int:
        return self.im_end_id

    @property
    def pad_id(self) -> int:
        return self.endoftext_id

    @property
    def stop_tokens(self) -> List[int]:
        return [self.im_end_id, self.endoftext_id]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode_plain(self, text: str) -> List[int]:
        # add_special_tokens=False: no post-processor additions; special-token *text* in the
        # input still maps to its id, as in HF.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Token ids of ``text``; ``add_eos`` appends ``<|im_end|>``.

        ``add_bos`` prepends ``bos_id`` only if the tokenizer was built with
        ``add_bos_token=True`` (mirrors HF, where SmolLM2 adds no BOS).
        """
        ids = self._encode_plain(text)
        if add_bos and self.add_bos_token:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; ``skip_special_tokens`` drops ``<|im_start|>`` etc."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_messages(
        self, messages: List[Message], add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        """ChatML token ids of a conversation and a same-length mask (True: not a training label).

        Each message contributes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, every token
        masked as ``message.masked`` says, so an unmasked assistant turn learns its content, its
        ``<|im_end|>`` (the eos) and the newline after it. With ``add_end_tokens=False`` the
        last message gets no ``<|im_end|>\\n``: a conversation ending in an empty assistant
        message then ends with ``<|im_start|>assistant\\n``, the generation prompt.
        """
        if self.system_prompt is not None and (not messages or messages[0].role != "system"):
            messages = [Message(role="system", content=self.system_prompt, masked=True)] + list(messages)
        if self.prompt_template is not None:
            messages = self.prompt_template(messages)

        tokens: List[int] = []
        mask: List[bool] = []
        for i, message in enumerate(messages):
            role = _ROLE_NAMES.get(message.role)
            if role is None:
                raise ValueError(f"unsupported message role {message.role!r}")
            text = ""
            for item in message.content:
                if item["type"] != "text":
                    raise ValueError(f"ChatMLTokenizer supports text only, got {item['type']!r} content")
                text += item["content"]
            # Header and content in one call: HF tokenizes the whole rendered conversation, and
            # special tokens split it, so "role\ncontent" is one stretch there too.
            ids = [self.im_start_id] + self._encode_plain(f"{role}\n{text}")
            if add_end_tokens or i < len(messages) - 1:
                ids += [self.im_end_id] + self._newline
            tokens += ids
            mask += [message.masked] * len(ids)
            if self.max_seq_len and self.truncation_type == "right" and len(tokens) >= self.max_seq_len:
                break  # the rest would be cut anyway

        if self.max_seq_len and len(tokens) > self.max_seq_len:
            if self.truncation_type == "right":
                # torchtune convention: a cut sequence still ends in eos, and that eos is masked.
                tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
                mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
            else:
                tokens, mask = tokens[-self.max_seq_len :], mask[-self.max_seq_len :]
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Replace ``sample["messages"]`` by ``"tokens"`` and ``"mask"``.

        ``inference=True`` (torchtune's generate recipe) leaves the last message open, so a
        trailing empty assistant message yields a prompt ending in ``<|im_start|>assistant\\n``.
        """
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def chatml_tokenizer(
    path: str,
    max_seq_len: Optional[int] = None,
    prompt_template: Union[str, dict, PromptTemplateInterface, None] = None,
    truncation_type: str = "right",
    system_prompt: Optional[str] = None,
) -> ChatMLTokenizer:
    """Builder for configs: a :class:`ChatMLTokenizer` over ``path`` (a ``tokenizer.json``).

    ``prompt_template`` may be a dotpath string or a role -> (prepend, append) dict, as in
    torchtune's own tokenizer builders.
    """
    if isinstance(prompt_template, (str, dict)):
        prompt_template = _get_prompt_template(prompt_template)
    return ChatMLTokenizer(
        path,
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
        truncation_type=truncation_type,
        system_prompt=system_prompt,
    )


# SmolLM2 uses plain ChatML; the alias keeps configs self-describing.
smollm2_tokenizer = chatml_tokenizer
