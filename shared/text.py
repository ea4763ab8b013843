"""Text in and out of token ids: tokenizer, incremental detokenizer, stop strings.

`Tokenizer` wraps a Hugging Face fast tokenizer (`tokenizer.json`) plus the BOS/EOS facts spread
over `tokenizer_config.json`, `generation_config.json` and `config.json`. `IncrementalDetokenizer`
turns a stream of token ids into text deltas that never cut a UTF-8 character in half.
`StopStringMatcher` cuts a text stream at the first stop string, holding back any tail that could
still become one. `TextStream` chains the two for one request.

What this module does not know: chat templates, sampling, or when generation ends on an EOS token
(the engine decides that from `eos_token_ids`). It never imports torch or grpc, so the scheduler
can tokenize and detokenize without loading either. Slow (Python-only) tokenizers are not
supported: a model directory must ship `tokenizer.json`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the generated ones, so that decoders which drop the
# first token's leading space (Metaspace / sentencepiece "▁") keep the space between
# prompt and completion. vLLM uses the same window.
_PREFIX_WINDOW = 5


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that spells each byte in a token -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """A fast tokenizer with the model's BOS/EOS conventions applied."""

    def __init__(
        self,
        hf_tokenizer: _HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: list[int] | None = None,
        add_bos_token: bool = False,
    ):
        self._tok = hf_tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(eos_token_ids or [])
        # BOS is added when the config asks for it, unless the tokenizer.json post-processor
        # already prepends it (Llama 3 style); encode() never doubles it either way.
        self.add_bos_token = add_bos_token

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer.json not found in {model_dir} (a Hugging Face fast tokenizer file is required)"
            )
        tok = _HFTokenizer.from_file(str(path))
        tok_cfg = _read_json(model_dir / "tokenizer_config.json")
        gen_cfg = _read_json(model_dir / "generation_config.json")
        model_cfg = _read_json(model_dir / "config.json")

        def token_id(entry: Any) -> int | None:
            # tokenizer_config stores a token as a string or as {"content": ..., ...}
            if isinstance(entry, dict):
                entry = entry.get("content")
            return tok.token_to_id(entry) if isinstance(entry, str) else None

        bos = token_id(tok_cfg.get("bos_token"))
        for fallback in (gen_cfg.get("bos_token_id"), model_cfg.get("bos_token_id")):
            if bos is None and isinstance(fallback, int):
                bos = fallback
        eos: list[int] = []
        primary_eos = token_id(tok_cfg.get("eos_token"))
        for candidate in [primary_eos, *_as_id_list(gen_cfg.get("eos_token_id"))]:
            if candidate is not None and candidate not in eos:
                eos.append(candidate)
        if not eos:
            eos = _as_id_list(model_cfg.get("eos_token_id"))
        return cls(tok, bos_token_id=bos, eos_token_ids=eos, add_bos_token=bool(tok_cfg.get("add_bos_token")))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens=False: the text's own tokens only, no BOS (a rendered chat template
        writes its special tokens itself, and transformers tokenizes it this way)."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens:
            return ids
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 length of the longest token string in the vocabulary: no token covers more bytes
        of a text than this (byte-level tokens spell one byte per character, sentencepiece byte
        fallbacks like "<0x41>" one byte in six), so a text of B bytes has at least
        B / max_token_bytes tokens, up to what a normalizer changes."""
        return max((len(t.encode("utf-8")) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that decode(skip_special_tokens=True) leaves out."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, also when they are not whole UTF-8 characters (then its
        decoded text is U+FFFD): a sentencepiece byte fallback "<0xE6>" is one byte, a byte-level
        token spells one byte per character."""
        text = self._tok.decode([token_id], skip_special_tokens=False)
        piece = self._tok.id_to_token(token_id)
        if "\ufffd" not in text or piece is None:
            return text.encode("utf-8")
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        if all(ch in _BYTE_LEVEL for ch in piece):
            return bytes(_BYTE_LEVEL[ch] for ch in piece)
        return text.encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def tokenizer_mismatch(target_dir: str | Path, draft_dir: str | Path) -> str | None:
    """Why a draft model cannot speculate for a target (its token ids mean other text), or None.
    Compares the vocabularies (token -> id) of the two tokenizer.json files."""
    target, draft = Tokenizer.from_dir(target_dir), Tokenizer.from_dir(draft_dir)
    target_vocab = target._tok.get_vocab(with_added_tokens=True)
    draft_vocab = draft._tok.get_vocab(with_added_tokens=True)
    if target_vocab == draft_vocab:
        return None
    differ = sum(1 for tok, i in draft_vocab.items() if target_vocab.get(tok) != i)
    return (
        f"the draft's tokenizer ({draft_dir}, {len(draft_vocab)} tokens) is not the target's "
        f"({target_dir}, {len(target_vocab)} tokens; {differ} draft tokens differ): a draft must share "
        "the target's tokenizer"
    )


class IncrementalDetokenizer:
    """Token ids in, finalized text deltas out.

    Decodes a small window of recent tokens twice, without and with the unread ones, and emits
    the difference. `prefix_offset:read_offset` is text already emitted (context only);
    `read_offset:` is pending. Pending text that ends in U+FFFD is a multibyte character split
    across tokens, so it waits for the next token. The emitted deltas concatenate to
    `decode(generated_ids)` (plus the leading space a sentencepiece decoder drops at the start).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_PREFIX_WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, new_ids: Sequence[int]) -> str:
        out = []
        # One token at a time, so a split character at the end of a multi-token push
        # (speculative decoding) does not hold back the complete text before it.
        for token_id in new_ids:
            if self._skip and token_id in self._tokenizer.special_token_ids:
                # decoded as if absent: kept out of the window, so that a long run of them
                # (EOS under ignore_eos) does not make every later decode longer
                continue
            self._ids.append(token_id)
            text = self._decode(self._prefix_offset)
            if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
                continue
            out.append(text[len(self._prefix_text) :])
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return "".join(out)

    def flush(self) -> str:
        """Whatever is still pending, replacement characters included (generation has ended)."""
        text = self._decode(self._prefix_offset)
        delta = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return delta


def partial_tail(text: str, tag: str) -> int:
    """How many trailing characters of a streamed text may be the start of `tag`, still arriving."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class StopStringMatcher:
    """Cuts a streamed text at the first completed stop string.

    The stop string and everything after it are never emitted. A tail that is a proper prefix
    of some stop string is held back until it is resolved. When two stop strings complete in the
    same chunk, the one that ends first wins (then the longer one), so the result does not
    depend on how the text was chunked: stops ["abcd", "bc"] on "abcd" give "a".
    """

    def __init__(self, stops: Sequence[str] = ()):
        self._stops = list(dict.fromkeys(stops))
        if any(not s for s in self._stops):
            raise ValueError("stop strings must be non-empty")
        self._prefixes = {s[:k] for s in self._stops for k in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that stopped the text

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + delta
        # (end, -start) of each stop's first occurrence; no stop can end inside text already
        # emitted, because a tail that could still complete one was held back.
        best: tuple[int, int] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), -start)
                if best is None or key < best:
                    best, self.matched = key, stop
        if best is not None:
            self.stopped = True
            self._held = ""
            return text[: -best[1]], True
        hold = 0
        for k in range(min(len(text), self._max_hold), 0, -1):
            if text[-k:] in self._prefixes:
                hold = k
                break
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


class TextStream:
    """Per-request text output: token ids -> detokenized deltas -> cut at stop strings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        stops: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self._matcher = StopStringMatcher(stops)
        self.text = ""  # everything emitted so far

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text (None: none did)."""
        return self._matcher.matched

    def push(self, new_token_ids: Sequence[int]) -> tuple[str, bool]:
        """Returns (text delta, stopped). After a stop, further pushes return ("", True)."""
        if self._matcher.stopped:
            return "", True
        delta, stopped = self._matcher.push(self._detok.push(new_token_ids))
        self.text += delta
        return delta, stopped

    def finish(self) -> str:
        """Generation ended without a stop string: the text still held back (may stop, too)."""
        if self._matcher.stopped:
            return ""
        delta, stopped = self._matcher.push(self._detok.flush())
        if not stopped:
            delta += self._matcher.flush()
        self.text += delta
        return delta


def validate_stop_strings(stops: Any, max_count: int = 16, max_len: int = 256) -> list[str]:
    """Checks a request's stop strings; raises ValueError naming the field `stop`."""
    if stops is None:
        return []
    if isinstance(stops, str) or not isinstance(stops, (list, tuple)):
        raise ValueError(f"stop: expected a list of strings, got {type(stops).__name__}")
    if len(stops) > max_count:
        raise ValueError(f"stop: at most {max_count} stop strings, got {len(stops)}")
    for i, stop in enumerate(stops):
        if not isinstance(stop, str):
            raise ValueError(f"stop[{i}]: expected a string, got {type(stop).__name__}")
        if not stop:
            raise ValueError(f"stop[{i}]: must not be empty")
        if len(stop) > max_len:
            raise ValueError(f"stop[{i}]: longer than {max_len} characters ({len(stop)})")
    return list(stops)
