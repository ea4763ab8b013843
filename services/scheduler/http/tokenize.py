"""The tokenizer routes vLLM serves beside its OpenAI API, which clients use to count and cut
prompts without a copy of the model's tokenizer (lm-eval-harness's `local-completions` finds a
server's tokenizer through them):

    POST /tokenize        {"prompt": ...} or {"messages": [...]} -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize      {"tokens": [...]} -> {"prompt"}
    GET  /tokenizer_info  the special tokens, the chat template and the model length

Tokenizing goes through `Frontend.encode` (a text too large for the model length is refused
before it is tokenized; a long one is tokenized off the event loop); messages are rendered by
the chat template exactly as /v1/chat/completions renders them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from services.common.errors import InvalidArgument
from shared.text import Tokenizer

from .chat import ChatTemplate
from .convert import render_messages
from .schemas import DetokenizeRequest, TokenizeRequest


class TokenizerRoutes:
    def __init__(
        self,
        tokenizer: Tokenizer,
        encode: Callable[..., Awaitable[list[int]]],
        chat_template: ChatTemplate | None,
        max_model_len: Callable[[], int | None],
    ):
        self._tokenizer = tokenizer
        self._encode = encode  # Frontend.encode
        self._chat_template = chat_template
        self._max_model_len = max_model_len

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise InvalidArgument("prompt", "give either prompt or messages")
        if body.messages is not None:
            text = render_messages(
                self._chat_template, body.messages, body.add_generation_prompt, body.chat_template_kwargs
            )
            special = bool(body.add_special_tokens)
        else:
            text, special = body.prompt, body.add_special_tokens is not False
        tokens = await self._encode(text, add_special_tokens=special) if text else []
        return {
            "count": len(tokens),
            "max_model_len": self._max_model_len(),
            "tokens": tokens,
            "token_strs": [self._tokenizer.id_to_token(t) for t in tokens] if body.return_token_strs else None,
        }

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        vocab = self._tokenizer.vocab_size
        for i, t in enumerate(body.tokens):
            if not 0 <= t < vocab:
                raise InvalidArgument("tokens", f"[{i}] {t} is not a token id in the vocabulary [0, {vocab})")
        return {"prompt": self._tokenizer.decode(body.tokens, skip_special_tokens=False)}

    async def tokenizer_info(self) -> dict[str, Any]:
        tok = self._tokenizer
        specials = dict(self._chat_template.special_tokens) if self._chat_template is not None else {}

        def text(token_id: int | None) -> str | None:
            return tok.id_to_token(token_id) if token_id is not None else None

        eos = tok.eos_token_ids
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": specials.get("bos_token") or text(tok.bos_token_id),
            "eos_token": specials.get("eos_token") or (text(eos[0]) if eos else None),
            "pad_token": specials.get("pad_token"),
            "unk_token": specials.get("unk_token"),
            "add_bos_token": tok.add_bos_token,
            "chat_template": self._chat_template.source if self._chat_template is not None else None,
            "model_max_length": self._max_model_len(),
            "vocab_size": tok.vocab_size,
        }
