"""Tensor <-> bytes for KV payloads, dtype names and checksums.

A KV payload is `[num_layers, 2, num_tokens, num_kv_heads, head_dim]` (k=0, v=1) in
float32, bfloat16 or float16, or an 8-bit cache's packed rows `[..., num_kv_heads, head_dim +
head_dim / 32]`: "fp8" (uint8 storage: e4m3 elements) or "int8" (int8 storage), each row's
E8M0 scales after its elements (shared.engine.model.kv_quant), moved as the bytes they are. Bytes are taken through a uint8 view of the tensor, so
bfloat16 needs no numpy support. Nothing here knows protobuf, gRPC or the engine.

Checksums, both as unsigned ints that fit a uint64 field:
- "crc32": zlib.crc32 of the raw bytes. Used for CPU payloads (about 3 GB/s per core).
- "sum64": sum of the payload read as int32 words (int16/uint8 when the byte count is
  not a multiple of 4), accumulated in int64 with wrap-around, taken mod 2**64. Integer
  addition is associative, so a CUDA reduction and a numpy one agree bit for bit. It
  costs one pass on the device instead of a device-to-host copy; it does not catch
  reordered words, which a p2p transfer of one contiguous buffer does not produce.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import torch

from shared.kv.errors import KvShapeMismatch

KV_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8": torch.uint8,  # packed 8-bit rows, named as TANDEM_KV_CACHE_DTYPE names them
    "int8": torch.int8,
}
_DTYPE_NAMES = {v: k for k, v in KV_DTYPES.items()}

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

CRC32 = "crc32"
SUM64 = "sum64"
_U64 = (1 << 64) - 1


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> wire name ("float32", "bfloat16", "float16", "fp8", "int8")."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise KvShapeMismatch(f"unsupported KV dtype {dtype}; expected one of {sorted(KV_DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Wire name -> torch dtype."""
    try:
        return KV_DTYPES[name]
    except KeyError:
        raise KvShapeMismatch(f"unsupported KV dtype {name!r}; expected one of {sorted(KV_DTYPES)}") from None


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of `t` in C order, in one copy (after a host copy for device tensors).

    A same-size integer view is legal for any strides, and numpy gathers a strided view
    into bytes single-threaded; `.contiguous()` first would be a second copy, and torch's
    threaded copy of many small strided blocks stalls on a loaded host.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy().tobytes()


def tensor_from_bytes(
    data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """A tensor over `data` without a copy.

    The result aliases `data`: treat it as read-only (scatter it somewhere, or clone it).
    """
    expected = _numel(shape) * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise KvShapeMismatch(
            f"{len(data)} bytes cannot hold {dtype_name(dtype)}{list(shape)} ({expected} bytes)"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # torch warns that an immutable `bytes` is not writable; callers only read it.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(dtype).view(shape)


def checksum_kind_for(device: torch.device | str) -> str:
    """The checksum a sender on `device` computes: crc32 on CPU, sum64 elsewhere."""
    return CRC32 if torch.device(device).type == "cpu" else SUM64


def checksum(t: torch.Tensor, kind: str) -> int:
    """Checksum of the raw bytes of `t` (see the module docstring for the kinds)."""
    t = t.detach().contiguous()
    acc = Checksummer(kind, t.numel() * t.element_size())
    acc.update(t.view(torch.uint8).reshape(-1))
    return acc.value


class Checksummer:
    """A checksum computed piece by piece, so it can run while the next piece is in flight.

    Pieces are consecutive byte ranges of one payload of `nbytes` bytes; every piece
    but the last must be a multiple of 4 bytes long (sum64 reads words).
    """

    def __init__(self, kind: str, nbytes: int):
        if kind not in (CRC32, SUM64):
            raise KvShapeMismatch(f"unknown checksum kind {kind!r}")
        self.kind = kind
        self.value = 0
        self._word = 4 if nbytes % 4 == 0 else 2 if nbytes % 2 == 0 else 1  # sum64 word size

    def update(self, raw: torch.Tensor) -> None:
        """Fold in the next piece: raw is [n] uint8, on any device."""
        if raw.numel() == 0:
            return
        if self.kind == CRC32:
            if raw.device.type != "cpu":
                raw = raw.cpu()
            self.value = zlib.crc32(raw.numpy(), self.value)
            return
        if raw.device.type == "cpu":
            words = raw.numpy().view(_NP_WORD[self._word])
            total = int(words.sum(dtype=np.int64))
        else:
            if raw.storage_offset() % 4:
                raw = raw.clone()  # a word view needs an aligned start
            total = int(raw.view(_TORCH_WORD[self._word]).sum(dtype=torch.int64).item())
        self.value = (self.value + total) & _U64


_NP_WORD = {4: np.int32, 2: np.int16, 1: np.uint8}
_TORCH_WORD = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
