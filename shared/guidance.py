"""Structured output with llguidance: a request's `Guidance` compiled to a grammar, checked,
and run as a matcher that says, before each sampled token, which tokens keep the output in
the language.

The scheduler checks a guidance with `check` (no tokenizer: syntax and schema errors) before
the request queues; the engine compiles it against the model's tokenizer (`Guide.matcher`).
Both raise InvalidRequest naming the field "guidance". No torch here except `allowed_tokens`.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.params import Guidance, InvalidRequest

if TYPE_CHECKING:
    import llguidance
    import torch

# JSON as the OpenAI API writes it: `{"a": 1, "b": [1, 2]}`, one space after ':' and ','
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar(g: Guidance) -> str:
    """The llguidance grammar of a guidance (not yet checked: `check` or `Guide.matcher` do)."""
    from llguidance import LLMatcher

    if g.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if g.kind == "json_schema":
        try:
            schema = json.loads(g.value)
        except (ValueError, RecursionError) as e:
            raise InvalidRequest("guidance", f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("guidance", "the JSON schema must be a JSON object")
        try:
            return LLMatcher.grammar_from_json_schema(closed(schema), defaults=_JSON_OPTIONS)
        except RecursionError:
            raise InvalidRequest("guidance", "the JSON schema is nested too deeply") from None
    if g.kind == "regex":
        return LLMatcher.grammar_from_regex(g.value)
    if g.kind == "lark":
        return LLMatcher.grammar_from_lark(g.value)
    raise InvalidRequest("guidance", f"unknown kind {g.kind!r}")


def after_reasoning(g: Guidance, tokenizer: llguidance.LLTokenizer) -> str:
    """The guidance's grammar, after a thinking model's free reasoning when it has a
    reasoning_end. With a reasoning_start, the output is either in the language from its first
    token or opens with reasoning_start (after any whitespace), reasons, and closes with
    reasoning_end; without one, it reasons from its first token (its prompt opened the block).
    The language holds after reasoning_end and any whitespace. A tag the vocabulary holds as one
    added token (llguidance matches those as tokens, never as text) is that token, and the
    reasoning may not spell the end tag in other tokens either; a tag the vocabulary does not
    hold is text, and the reasoning ends at its first occurrence."""
    answer = grammar(g)
    if not g.reasoning_end:
        return answer
    top = json.loads(answer) if answer.lstrip().startswith("{") else {"grammars": [{"lark_grammar": answer}]}
    subs = top["grammars"]
    subs[0] = {**subs[0], "name": "answer"}

    def tag(text: str) -> str:
        ids = tokenizer.tokenize_str(text)
        return f"<[{ids[0]}]>" if len(ids) == 1 and tokenizer.is_special_token(ids[0]) else json.dumps(text)

    end = tag(g.reasoning_end)
    if g.reasoning_start:
        rules = [f"start: @answer | WS {tag(g.reasoning_start)} thinking WS @answer"]
    else:
        rules = ["start: thinking WS @answer"]
    if end.startswith("<["):  # the free text holds no added token; nor may it spell the end tag
        spelled = json.dumps(g.reasoning_end)
        rules += [f"thinking: TEXT {end}", f"TEXT: /(?s:.*)/ & ~(/(?s:.*)/ {spelled} /(?s:.*)/)"]
    else:
        rules.append(f"thinking[lazy]: /(?s:.*)/ {end}")
    rules.append("WS: /[ \\t\\r\\n]*/")
    lark = "\n".join(rules) + "\n"
    return json.dumps({"grammars": [{"lark_grammar": lark}, *subs], "max_tokens": top.get("max_tokens")})


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMAS = ("items", "additionalItems", "contains", "propertyNames")
# keywords that make an object schema a composition: its listed properties are not all it takes
_COMPOSED = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "unevaluatedProperties")


def closed(schema: Any) -> Any:
    """The schema with every plain object that lists its properties, and says nothing of
    others, taking no others (additionalProperties: false), as vLLM's default backend reads a
    schema: JSON Schema itself allows any extra key there, and a model given the choice writes
    some, where a caller who listed the fields (a pydantic model, a function's parameters) wants
    those. An object composed with allOf / anyOf / if ... is left as it is, and so are the
    schemas it is composed of (closing them would change what the whole accepts); a pure union
    (anyOf / oneOf without properties beside it: pydantic's Optional and Union) has each
    alternative closed."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    composed = any(k in out for k in _COMPOSED)
    if "properties" in out and "additionalProperties" not in out and not composed:
        out["additionalProperties"] = False
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMAS:
        if key in out:
            out[key] = [closed(s) for s in out[key]] if isinstance(out[key], list) else closed(out[key])
    if isinstance(out.get("prefixItems"), list):
        out["prefixItems"] = [closed(s) for s in out["prefixItems"]]
    if "properties" not in out:
        for key in ("anyOf", "oneOf"):
            if isinstance(out.get(key), list):
                out[key] = [closed(s) for s in out[key]]
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    return out


def hoisted(schema: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema without its $defs / definitions, those definitions renamed `prefix` + name),
    its references rewritten to match: so that it can sit inside another schema whose root
    holds the definitions (tool_choice "required" nests each tool's parameters)."""
    names = {}
    defs = {}
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            names[f"#/{key}/{name}"] = f"#/$defs/{prefix}{name}"
            defs[prefix + name] = sub

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (names.get(v, v) if k == "$ref" and isinstance(v, str) else rewrite(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    return rewrite(body), {name: rewrite(sub) for name, sub in defs.items()}


def lark_grammar(grammar: str) -> str:
    """A grammar as llguidance's Lark: GBNF (llama.cpp's and xgrammar's EBNF, rules written with
    `::=`, as vLLM users send them) is converted; anything else is taken as Lark."""
    if "::=" in grammar:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            return gbnf_to_lark(grammar)
        except Exception as e:  # noqa: BLE001 - llguidance's converter raises its own errors
            raise InvalidRequest("guidance", f"invalid GBNF grammar: {e}") from None
    return grammar


def choice_grammar(choices: list[str]) -> str:
    """A Lark grammar whose language is exactly these strings (vLLM's guided_choice)."""
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def _refuse(g: Guidance, error: str) -> InvalidRequest:
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return InvalidRequest("guidance", f"invalid {g.kind.replace('_', ' ')}: {' '.join(lines[:3])}")


def check(g: Guidance) -> None:
    """Raise InvalidRequest when the guidance does not compile (no tokenizer needed)."""
    from llguidance import LLMatcher

    try:
        error = LLMatcher.validate_grammar(grammar(g))
    except RecursionError:
        error = "nested too deeply"
    if error:
        raise _refuse(g, error)


class Guide:
    """One model's llguidance tokenizer (built from tokenizer.json, in the background from
    `warm`, else on first use) and the matchers made with it."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int]):
        self.path = Path(model_dir) / "tokenizer.json"
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._error: str | None = None  # why there is none
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Build the tokenizer on a background thread (about a second for a 128k vocabulary), so
        that the first structured-output request does not stall the engine's thread for it."""

        def build() -> None:
            try:
                self._llg_tokenizer()
            except InvalidRequest:
                pass  # said again to each structured-output request

        threading.Thread(target=build, name="guidance-tokenizer", daemon=True).start()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            return self._build()

    def _build(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None and self._error is None:
            try:
                from llguidance import LLTokenizer
            except ImportError:
                self._error = "structured output needs the llguidance package (pip install llguidance)"
                raise InvalidRequest("guidance", self._error) from None
            if not self.path.is_file():
                self._error = f"structured output needs the model's tokenizer.json ({self.path.name} missing)"
            else:
                try:
                    self._tokenizer = LLTokenizer(
                        str(self.path), n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
                    )
                except Exception as e:  # noqa: BLE001 - llguidance cannot read every tokenizer.json
                    self._error = f"structured output is not available for this model's tokenizer ({e})"
        if self._tokenizer is None:
            raise InvalidRequest("guidance", self._error)  # once found, said to every request
        return self._tokenizer

    def matcher(self, g: Guidance, generated: list[int] = ()) -> llguidance.LLMatcher:
        """A matcher for this guidance that has consumed `generated` (a resumed request's earlier
        outputs); InvalidRequest when the guidance does not compile or they leave the language."""
        from llguidance import LLMatcher

        tokenizer = self._llg_tokenizer()
        m = LLMatcher(tokenizer, after_reasoning(g, tokenizer), log_level=0)
        if m.is_error():
            raise _refuse(g, m.get_error())
        if generated and not m.consume_tokens(list(generated)):
            raise InvalidRequest("guidance", "the tokens generated so far are outside the requested format")
        return m


@functools.cache
def _bit_shifts() -> torch.Tensor:
    import torch

    return torch.arange(32, dtype=torch.int32)


def allowed_tokens(matcher: llguidance.LLMatcher, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bool: the tokens the matcher takes next."""
    import torch

    words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
    bits = (words[:, None] >> _bit_shifts()) & 1
    allowed = bits.flatten()[:vocab_size].bool()
    if allowed.shape[0] < vocab_size:  # ids past the tokenizer's words (padding rows of the vocabulary)
        allowed = torch.cat([allowed, allowed.new_zeros(vocab_size - allowed.shape[0])])
    return allowed
