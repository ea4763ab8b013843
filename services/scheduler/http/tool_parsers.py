"""Tool calls written in free text, for tool_choice "auto": each model family writes a call in
its own format, which its chat template teaches it. A parser finds the calls in a finished
choice's text and says, while it streams, how much of the text is surely not part of a call.

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Qwen2, Qwen2.5, Qwen3,
                 Hermes and the many fine-tunes that use their templates)
    llama3_json  the whole reply is {"name": ..., "parameters": {...}}, several joined by ";"
                 (Llama 3.1-3.3's JSON tool calling; an optional <|python_tag|> first)

`detect` picks one from the chat template's source (TANDEM_TOOL_CALL_PARSER=auto). Knows
nothing of HTTP.
"""

from __future__ import annotations

import json
import re
from typing import Any

from shared.text import partial_tail

Call = tuple[str, dict[str, Any]]  # (function name, arguments)


def _call(value: Any, args_key: str) -> Call | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get(args_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    return (value["name"], args) if isinstance(args, dict) else None


class HermesParser:
    name = "hermes"
    START = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def streamable(self, text: str) -> int:
        """How many leading characters of the text are content whatever follows (whitespace
        before a possible call waits: the content before a call goes out without it)."""
        end = text.find(self.START)
        if end < 0:
            end = len(text) - partial_tail(text, self.START)
        return len(text[:end].rstrip())

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """(the content before the first call, the calls); no calls when any block is not a call."""
        at = text.find(self.START)
        if at < 0:
            return text, []
        calls = []
        for block in self._BLOCK.findall(text[at:]):
            try:
                call = _call(json.loads(block), "arguments")
            except (ValueError, RecursionError):
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return text[:at].rstrip(), calls


class Llama3JsonParser:
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def streamable(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or self.TAG.startswith(body[: len(self.TAG)]):
            return 0  # a reply that opens like a call is held back until it is done
        return len(text)

    def parse(self, text: str) -> tuple[str, list[Call]]:
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls, decoder, pos = [], json.JSONDecoder(), 0
        while pos < len(body):
            try:
                value, pos = decoder.raw_decode(body, pos)
            except (ValueError, RecursionError):
                return text, []
            call = _call(value, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            rest = body[pos:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            pos = len(body) - len(rest)
        return "", calls


PARSERS = {p.name: p for p in (HermesParser(), Llama3JsonParser())}
ToolParser = HermesParser | Llama3JsonParser


def detect(template_source: str | None) -> ToolParser | None:
    """The parser a chat template's own tool-call format needs (None: it writes none we know)."""
    if not template_source:
        return None
    if "<tool_call>" in template_source:
        return PARSERS["hermes"]
    if "<|python_tag|>" in template_source or ('"parameters"' in template_source and "ipython" in template_source):
        return PARSERS["llama3_json"]
    return None


def choose(setting: str, template_source: str | None) -> ToolParser | None:
    """TANDEM_TOOL_CALL_PARSER: auto (from the template), none, or a parser's name."""
    if setting == "auto":
        return detect(template_source)
    if setting == "none":
        return None
    return PARSERS[setting]
