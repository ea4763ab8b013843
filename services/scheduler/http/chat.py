"""A model's chat template: found in its directory, rendered the way transformers renders it.

The template comes from `chat_template.jinja` in the model directory, else from the
`chat_template` field of `tokenizer_config.json` (a string, or a list of named templates of
which `default` is used). Templates are untrusted code from a model hub: they run in Jinja's
`ImmutableSandboxedEnvironment` with the environment `transformers.apply_chat_template` gives
them (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML, `{% generation %}` blocks rendered as their body), and the special
tokens of tokenizer_config.json (`bos_token`, `eos_token`, ...) as variables. The rendered text
is tokenized without adding special tokens: the template writes them itself.

Knows nothing of HTTP or of the request's other fields.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The template refused the messages (its raise_exception) or failed while rendering."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(entry: Any) -> str | None:
    # tokenizer_config stores a special token as a string or as {"content": ..., ...}
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(
                f"the chat template does not compile (line {e.lineno}: {e.message})"
            ) from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The model's template, or None when it has none."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        specials = {k: t for k in _SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        file = model_dir / TEMPLATE_FILE
        if file.is_file():
            return cls(file.read_text(encoding="utf-8"), specials)
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if isinstance(source, str) and source:
            return cls(source, specials)
        return None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages` (role/content dicts). Raises TemplateError."""
        try:
            return self._template.render(
                **self.special_tokens,
                **kwargs,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(str(e)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise TemplateError(
                f"the chat template failed on these messages ({type(e).__name__}: {e})"
            ) from None
