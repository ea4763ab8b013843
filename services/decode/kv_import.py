"""Receive one request's prompt KV from a prefill worker into its reserved blocks.

Pieces are verified as they arrive (crc32 per gRPC chunk, the sender's checksum for a
collective transfer) and handed to the engine's `import_kv` (engine interface). Imports are
batched: at most one engine call per request is in flight, and it takes every piece that
arrived meanwhile, so a long transfer costs few engine round trips.
"""

from __future__ import annotations

import asyncio
import time

from shared.engine import EngineClient, Reservation
from shared.kv.chunks import KvAssembler, KvChunk, KvPiece
from shared.kv.collective import TransferMeta
from shared.kv.collective_receiver import CollectiveKvReceiver
from shared.kv.errors import KvShapeMismatch, KvTransferError


class KvImporter:
    """The receiving end of one request's KV transfer."""

    def __init__(
        self,
        engine: EngineClient,
        reservation: Reservation,
        shape: tuple[int, ...],  # [num_layers, 2, num_prompt_tokens, num_kv_heads, head_dim]
        dtype: str,
        receiver: CollectiveKvReceiver | None = None,
        timeout_s: float | None = None,
    ):
        self._engine = engine
        self._reservation = reservation
        self._request_id = reservation.request_id
        self._assembler = KvAssembler(shape, dtype)
        self._receiver = receiver
        self._timeout_s = timeout_s
        self._pending: list[KvPiece] = []
        self._task: asyncio.Task | None = None
        self._collective_done = False
        self.num_pieces = 0
        self.num_bytes = 0
        self._first_at: float | None = None  # perf_counter() when the first piece arrived
        self.seconds = 0.0  # first piece arrived -> every piece imported (set by finish)

    def add_chunk(self, chunk: KvChunk) -> None:
        """Verify a gRPC chunk (raises KvChecksumError / KvShapeMismatch) and queue its import."""
        self._first_at = self._first_at or time.perf_counter()
        piece = self._assembler.add(chunk)
        self.num_bytes += len(chunk.data)
        self._queue(piece)

    async def add_collective(self, meta: TransferMeta) -> None:
        """Claim a collective transfer (the whole payload) and queue its import."""
        self._first_at = self._first_at or time.perf_counter()
        if self._receiver is None:
            raise KvTransferError("collective KV arrived, but this worker has no KV receiver")
        if tuple(meta.shape) != self._assembler.shape or meta.dtype != self._assembler.dtype_name:
            raise KvShapeMismatch(
                f"collective KV is {meta.dtype}{list(meta.shape)}, expected "
                f"{self._assembler.dtype_name}{list(self._assembler.shape)}"
            )
        try:
            tensor = await self._receiver.recv_async(meta, timeout_s=self._timeout_s)
        except asyncio.CancelledError:
            self._receiver.discard(meta.transfer_id)  # nobody will claim it now
            raise
        self._collective_done = True
        self.num_bytes += meta.nbytes
        self._queue(KvPiece(tensor, 0, 0))

    def _queue(self, piece: KvPiece) -> None:
        self.num_pieces += 1
        self._pending.append(piece)
        if self._task is not None and self._task.done():
            self._task.result()  # re-raise a failed import
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name=f"kv-import-{self._request_id}")

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            await self._engine.import_kv(self._reservation, batch)

    async def finish(self) -> None:
        """Wait until every queued piece is in the blocks; raise unless the whole prompt arrived."""
        if self._task is not None:
            await self._task
        if not (self._collective_done or self._assembler.complete):
            raise KvTransferError(
                f"KV of {self._request_id} incomplete: missing chunks {self._assembler.missing()[:8]}"
            )
        if self._first_at is not None:
            self.seconds = time.perf_counter() - self._first_at

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def close(self) -> None:
        """Cancel pending imports and wait until none is left running (its failure is moot then)."""
        self.cancel()
        if self._task is not None:
            try:
                await self._task
            except BaseException:  # noqa: BLE001 - cancelled or failed: either way nothing runs now
                pass
