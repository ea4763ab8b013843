"""KV payloads cut into gRPC-sized chunks and put back together, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shared.kv import (
    KvAssembler,
    KvChecksumError,
    KvDuplicateChunk,
    KvShapeMismatch,
    KvTransferError,
    assemble_kv,
    split_kv,
)
from shared.kv.payload import CRC32, SUM64, checksum


def _kv(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape, max_bytes",
    [
        ((4, 2, 37, 3, 8), 1 << 20),  # everything in one chunk
        ((5, 2, 37, 3, 8), 2 * 37 * 3 * 8 * 4 * 2 + 17),  # several layers per chunk, ragged last chunk
        ((3, 2, 101, 2, 6), 2 * 2 * 6 * 4 * 7 + 5),  # layers cut along tokens, odd sizes
        ((1, 2, 1, 1, 1), 64),  # one element per k/v
    ],
)
def test_round_trip_is_bit_exact_and_chunks_respect_the_bound(shape, max_bytes, dtype):
    kv = _kv(shape, dtype)
    kv.view(-1)[0] = float("nan")  # a NaN payload must survive too (compared as bits)
    chunks = list(split_kv(kv, max_chunk_bytes=max_bytes))
    assert all(len(c.data) <= max_bytes for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.total for c in chunks} == {len(chunks)}
    out = assemble_kv(chunks, shape, dtype)
    assert out.dtype == dtype
    assert torch.equal(_bits(out), _bits(kv))


def test_out_of_order_chunks_scatter_to_the_right_place():
    kv = _kv((3, 2, 50, 2, 4), torch.bfloat16)
    chunks = list(split_kv(kv, max_chunk_bytes=2 * 2 * 4 * 2 * 9))
    assert len(chunks) > 6
    asm = KvAssembler(kv.shape, "bfloat16")
    out = torch.zeros_like(kv)
    for chunk in reversed(chunks):
        piece = asm.add(chunk)
        n_layers, _, n_tokens = piece.tensor.shape[:3]
        out[
            piece.layer_start : piece.layer_start + n_layers,
            :,
            piece.token_start : piece.token_start + n_tokens,
        ] = piece.tensor
    assert asm.complete and asm.missing() == []
    assert torch.equal(_bits(out), _bits(kv))


def test_default_chunks_stay_well_under_grpc_limit():
    kv = _kv((4, 2, 300, 8, 128), torch.float32)  # 9.8 MB
    chunks = list(split_kv(kv))
    assert len(chunks) >= 10
    assert max(len(c.data) for c in chunks) <= 1 << 20


def test_non_contiguous_payload_is_sent_as_its_values():
    base = _kv((2, 2, 10, 4, 8), torch.float16)
    kv = base[:, :, :, ::2]  # a strided view
    out = assemble_kv(split_kv(kv, max_chunk_bytes=256), kv.shape, torch.float16)
    assert torch.equal(out, kv)


def test_corrupted_byte_is_a_checksum_error():
    kv = _kv((2, 2, 16, 2, 4), torch.float32)
    chunks = list(split_kv(kv, max_chunk_bytes=512))
    data = bytearray(chunks[1].data)
    data[7] ^= 0x01
    bad = dataclasses.replace(chunks[1], data=bytes(data))
    asm = KvAssembler(kv.shape, torch.float32)
    asm.add(chunks[0])
    with pytest.raises(KvChecksumError):
        asm.add(bad)
    asm.add(chunks[1])  # the good copy is still accepted: nothing was recorded for the bad one


def test_missing_chunk_is_detected():
    kv = _kv((2, 2, 16, 2, 4), torch.float32)
    chunks = list(split_kv(kv, max_chunk_bytes=512))
    asm = KvAssembler(kv.shape, torch.float32)
    assert not asm.complete and asm.missing() == [0]
    for c in chunks[:2] + chunks[3:]:
        asm.add(c)
    assert not asm.complete
    assert asm.missing() == [2]
    c = chunks[2]
    assert asm.missing_ranges() == [(c.layer_start, c.layer_end, c.token_start, c.token_end)]
    with pytest.raises(KvTransferError, match="missing"):
        assemble_kv(chunks[:2] + chunks[3:], kv.shape, torch.float32)


def test_wrong_expected_shape_or_dtype_is_rejected():
    kv = _kv((2, 2, 16, 2, 4), torch.float32)
    chunk = list(split_kv(kv, max_chunk_bytes=512))[-1]  # layer 1, tokens 8..16
    with pytest.raises(KvShapeMismatch):
        KvAssembler((2, 2, 16, 4, 4), torch.float32).add(chunk)  # other head count
    with pytest.raises(KvShapeMismatch):
        KvAssembler((2, 2, 8, 2, 4), torch.float32).add(chunk)  # fewer tokens than the chunk covers
    with pytest.raises(KvShapeMismatch):
        KvAssembler(kv.shape, torch.float16).add(chunk)
    with pytest.raises(KvShapeMismatch):
        KvAssembler((2, 16, 2, 4), torch.float32)


def test_duplicate_and_out_of_range_chunks_are_rejected():
    kv = _kv((2, 2, 16, 2, 4), torch.float32)
    chunks = list(split_kv(kv, max_chunk_bytes=512))
    asm = KvAssembler(kv.shape, torch.float32)
    asm.add(chunks[0])
    with pytest.raises(KvDuplicateChunk):
        asm.add(chunks[0])
    with pytest.raises(KvDuplicateChunk):  # same range under another index
        asm.add(dataclasses.replace(chunks[0], index=len(chunks) - 1))
    with pytest.raises(KvShapeMismatch):
        asm.add(dataclasses.replace(chunks[1], index=len(chunks)))
    with pytest.raises(KvShapeMismatch):
        asm.add(dataclasses.replace(chunks[1], total=len(chunks) + 1))
    with pytest.raises(KvShapeMismatch):
        asm.add(dataclasses.replace(chunks[1], layer_start=5, layer_end=6))


def test_chunk_bound_below_one_token_is_refused():
    with pytest.raises(ValueError):
        list(split_kv(_kv((1, 2, 4, 8, 128), torch.float32), max_chunk_bytes=1024))


def test_checksums_agree_across_word_views():
    kv = _kv((2, 2, 3, 1, 5), torch.bfloat16)  # 120 bytes, and a 2-byte-aligned slice below
    assert checksum(kv, CRC32) == checksum(kv.clone(), CRC32)
    assert checksum(kv, SUM64) != checksum(kv + 1, SUM64)
    odd = kv.reshape(-1)[1:]  # 59 bf16 values = 118 bytes: int16 words
    assert checksum(odd, SUM64) == checksum(odd.clone(), SUM64)
