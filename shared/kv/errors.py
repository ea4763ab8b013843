"""Errors raised by the KV transports.

Every error is a `KvTransferError`, so a decode worker that owns reserved blocks can catch
one type, free the blocks and report the failure. Mapping to gRPC status codes is the
servicer's job; nothing here knows about gRPC.
"""

from __future__ import annotations


class KvTransferError(RuntimeError):
    """A KV payload could not be moved intact."""


class KvChecksumError(KvTransferError):
    """The bytes that arrived are not the bytes that were sent."""


class KvShapeMismatch(KvTransferError):
    """A piece does not fit the expected payload (shape, dtype or range)."""


class KvDuplicateChunk(KvTransferError):
    """The same chunk (or an overlapping range) arrived twice."""


class KvTransferTimeout(KvTransferError):
    """A transfer did not finish within its timeout; its pair group has been torn down."""
