"""KV payloads as checksummed chunks, for the gRPC stream transport.

The prefill side cuts a payload `[num_layers, 2, num_tokens, num_kv_heads, head_dim]`
into `KvChunk`s along layers and tokens (`split_kv`); the decode side checks each chunk
as it arrives (`KvAssembler.add`) and scatters the returned piece straight into its
reserved blocks, so a whole second copy of the payload never exists on the receiver.

This module knows neither protobuf nor the engine: the services copy `KvChunk` fields
into their own messages, and call `engine.import_kv(rid, piece.tensor,
piece.layer_start, piece.token_start)` with what `add` returns.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from shared.kv.errors import KvChecksumError, KvDuplicateChunk, KvShapeMismatch, KvTransferError
from shared.kv.payload import dtype_from_name, dtype_name, tensor_from_bytes, tensor_to_bytes

# gRPC's default max message is 4 MiB; 1 MiB of payload leaves room for framing and
# keeps the receiver's per-chunk latency small.
DEFAULT_MAX_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class KvChunk:
    """One sub-tensor `kv[layer_start:layer_end, :, token_start:token_end]` as bytes."""

    index: int  # 0 .. total-1, in send order
    total: int  # number of chunks in the payload
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    dtype: str  # "float32" | "bfloat16" | "float16" | "fp8" | "int8" (packed 8-bit rows)
    shape: tuple[int, ...]  # [layer_end-layer_start, 2, token_end-token_start, H, D]
    data: bytes  # raw little-endian bytes of the contiguous sub-tensor
    crc32: int  # zlib.crc32(data)


class KvPiece(NamedTuple):
    """A verified chunk as a tensor, and where it goes in the payload."""

    tensor: torch.Tensor  # [n_layers, 2, n_tokens, H, D]; aliases the chunk bytes: read-only
    layer_start: int
    token_start: int


def _check_kv(kv: torch.Tensor) -> None:
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise KvShapeMismatch(
            f"KV payload must be [layers, 2, tokens, heads, head_dim], got {list(kv.shape)}"
        )
    dtype_name(kv.dtype)  # raises for unsupported dtypes


def plan_chunks(
    shape: tuple[int, ...], element_size: int, max_chunk_bytes: int
) -> list[tuple[int, int, int, int]]:
    """(layer_start, layer_end, token_start, token_end) of each chunk, in send order.

    Whole layers are grouped while they fit; a layer too big for one chunk is cut along
    tokens. Every chunk holds at most `max_chunk_bytes` bytes.
    """
    num_layers, _, num_tokens, num_heads, head_dim = shape
    token_bytes = 2 * num_heads * head_dim * element_size  # one token of one layer, k and v
    if token_bytes > max_chunk_bytes:
        raise ValueError(
            f"max_chunk_bytes={max_chunk_bytes} is below one token of one layer ({token_bytes} bytes)"
        )
    if num_layers == 0 or num_tokens == 0:
        return []
    layer_bytes = num_tokens * token_bytes
    if layer_bytes <= max_chunk_bytes:
        step = max_chunk_bytes // layer_bytes
        return [(l0, min(l0 + step, num_layers), 0, num_tokens) for l0 in range(0, num_layers, step)]
    step = max_chunk_bytes // token_bytes
    return [
        (layer, layer + 1, t0, min(t0 + step, num_tokens))
        for layer in range(num_layers)
        for t0 in range(0, num_tokens, step)
    ]


def split_kv(kv: torch.Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Iterator[KvChunk]:
    """Cut `kv` into checksummed chunks of at most `max_chunk_bytes` data bytes each.

    A CUDA payload is copied to the host once, up front. Chunks are produced lazily, so
    a stream can send chunk i while chunk i+1 is being cut.
    """
    _check_kv(kv)
    kv = kv.detach().cpu()
    name = dtype_name(kv.dtype)
    plan = plan_chunks(tuple(kv.shape), kv.element_size(), max_chunk_bytes)
    for index, (l0, l1, t0, t1) in enumerate(plan):
        sub = kv[l0:l1, :, t0:t1]  # strided unless t0:t1 spans all tokens
        data = tensor_to_bytes(sub)
        yield KvChunk(
            index=index,
            total=len(plan),
            layer_start=l0,
            layer_end=l1,
            token_start=t0,
            token_end=t1,
            dtype=name,
            shape=tuple(sub.shape),
            data=data,
            crc32=zlib.crc32(data),
        )


class KvAssembler:
    """Checks the chunks of one payload as they arrive and says where each one goes.

    `add` raises (and records nothing) for a chunk that is corrupt (`KvChecksumError`),
    does not fit the expected payload (`KvShapeMismatch`) or repeats one already
    accepted (`KvDuplicateChunk`). Chunks may arrive in any order.
    """

    def __init__(self, expected_shape: tuple[int, ...] | torch.Size, dtype: torch.dtype | str):
        self.shape = tuple(int(s) for s in expected_shape)
        if len(self.shape) != 5 or self.shape[1] != 2:
            raise KvShapeMismatch(
                f"expected shape must be [layers, 2, tokens, heads, head_dim], got {self.shape}"
            )
        self.dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        self.dtype_name = dtype_name(self.dtype)
        self.num_chunks: int | None = None  # learnt from the first chunk
        self.num_bytes_received = 0
        self._received: set[int] = set()
        num_layers, _, num_tokens = self.shape[:3]
        self._covered = np.zeros((num_layers, num_tokens), dtype=bool)  # [L, T]

    def add(self, chunk: KvChunk) -> KvPiece:
        """Verify `chunk`; return its tensor and its (layer_start, token_start)."""
        self._check_header(chunk)
        if zlib.crc32(chunk.data) != chunk.crc32:
            raise KvChecksumError(f"chunk {chunk.index}/{chunk.total}: crc32 mismatch")
        tensor = tensor_from_bytes(chunk.data, self.dtype, chunk.shape)
        if self._covered[chunk.layer_start : chunk.layer_end, chunk.token_start : chunk.token_end].any():
            raise KvDuplicateChunk(
                f"chunk {chunk.index}: layers [{chunk.layer_start}, {chunk.layer_end}) tokens "
                f"[{chunk.token_start}, {chunk.token_end}) overlap data already received"
            )
        self.num_chunks = chunk.total
        self._received.add(chunk.index)
        self._covered[chunk.layer_start : chunk.layer_end, chunk.token_start : chunk.token_end] = True
        self.num_bytes_received += len(chunk.data)
        return KvPiece(tensor, chunk.layer_start, chunk.token_start)

    def _check_header(self, chunk: KvChunk) -> None:
        where = f"chunk {chunk.index}/{chunk.total}"
        if chunk.dtype != self.dtype_name:
            raise KvShapeMismatch(f"{where}: dtype {chunk.dtype}, expected {self.dtype_name}")
        if chunk.total < 1 or (self.num_chunks is not None and chunk.total != self.num_chunks):
            raise KvShapeMismatch(f"{where}: total {chunk.total}, expected {self.num_chunks}")
        if not 0 <= chunk.index < chunk.total:
            raise KvShapeMismatch(f"{where}: index out of range")
        if chunk.index in self._received:
            raise KvDuplicateChunk(f"{where}: already received")
        num_layers, _, num_tokens, num_heads, head_dim = self.shape
        if not (0 <= chunk.layer_start < chunk.layer_end <= num_layers) or not (
            0 <= chunk.token_start < chunk.token_end <= num_tokens
        ):
            raise KvShapeMismatch(
                f"{where}: layers [{chunk.layer_start}, {chunk.layer_end}) tokens "
                f"[{chunk.token_start}, {chunk.token_end}) outside payload {list(self.shape)}"
            )
        expected = (
            chunk.layer_end - chunk.layer_start,
            2,
            chunk.token_end - chunk.token_start,
            num_heads,
            head_dim,
        )
        if tuple(chunk.shape) != expected:
            raise KvShapeMismatch(f"{where}: shape {list(chunk.shape)}, expected {list(expected)}")

    @property
    def complete(self) -> bool:
        """Every (layer, token) of the payload has arrived, and every announced chunk."""
        if self.num_chunks is not None and len(self._received) != self.num_chunks:
            return False
        return bool(self._covered.all())

    def missing(self) -> list[int]:
        """Indices of chunks not received yet ([0] while no chunk has told the count)."""
        if self.num_chunks is None:
            return [] if self._covered.all() else [0]
        return [i for i in range(self.num_chunks) if i not in self._received]

    def missing_ranges(self) -> list[tuple[int, int, int, int]]:
        """(layer_start, layer_end, token_start, token_end) ranges not covered yet."""
        ranges: list[tuple[int, int, int, int]] = []
        for layer, row in enumerate(self._covered):
            holes = np.flatnonzero(~row)
            if holes.size == 0:
                continue
            # split the uncovered token indices into runs of consecutive tokens
            breaks = np.flatnonzero(np.diff(holes) != 1)
            starts = np.concatenate(([holes[0]], holes[breaks + 1]))
            ends = np.concatenate((holes[breaks], [holes[-1]])) + 1
            ranges.extend((layer, layer + 1, int(s), int(e)) for s, e in zip(starts, ends, strict=True))
        return ranges


def assemble_kv(
    chunks: Iterable[KvChunk], expected_shape: tuple[int, ...], dtype: torch.dtype | str
) -> torch.Tensor:
    """All of `chunks` into one new tensor (tests, benchmarks, callers without blocks)."""
    asm = KvAssembler(expected_shape, dtype)
    out = torch.empty(asm.shape, dtype=asm.dtype)
    for chunk in chunks:
        piece = asm.add(chunk)
        n_layers, _, n_tokens = piece.tensor.shape[:3]
        out[
            piece.layer_start : piece.layer_start + n_layers,
            :,
            piece.token_start : piece.token_start + n_tokens,
        ] = piece.tensor
    if not asm.complete:
        raise KvTransferError(f"KV payload incomplete: missing chunks {asm.missing()[:16]}")
    return out
