"""Tokenizing prompts without stalling the event loop.

A short text is encoded on the event loop: well under a millisecond, less than any hand-off.
A long one is encoded in a worker process. A thread is not enough: the tokenizers library
releases the GIL while it encodes (in its batch calls only), but building and freeing the result's
Python objects holds it, about a second for a million tokens on a slow CPU, during which no
other request moves. The processes start on the first long text (spawned, never forked: the
scheduler runs gRPC threads) and get the tokenizer once, pickled; ids come back as one
array of uint32.

What this module does not know: whether a text is too long for the model (the caller checks
its byte size before, and its token count after; see validation.py).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from array import array
from concurrent.futures import ProcessPoolExecutor

from shared.text import Tokenizer

# Texts up to this many characters are encoded on the event loop.
INLINE_CHARS = 4096

_worker_tokenizer: Tokenizer | None = None  # set in each worker process by _init_worker


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(text: str, add_special_tokens: bool) -> bytes:
    return array("I", _worker_tokenizer.encode(text, add_special_tokens)).tobytes()


class PromptEncoder:
    """`await encode(text)`: token ids, computed off the event loop for long texts."""

    def __init__(self, tokenizer: Tokenizer, *, processes: int = 2):
        self._tokenizer = tokenizer
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) <= INLINE_CHARS:
            return self._tokenizer.encode(text, add_special_tokens)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self._processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self._tokenizer,),
            )
        data = await asyncio.get_running_loop().run_in_executor(
            self._pool, _encode_in_worker, text, add_special_tokens
        )
        return array("I", data).tolist()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
