"""CUDA graphs for decode steps: the whole forward pass of a decode batch replayed as one graph.

A decode step of a small batch on a GPU costs more in Python and kernel launches (a dozen
per layer) than in arithmetic. As in vLLM and nano-vllm, the forward pass is captured once
per padded batch size ("bucket": 1, 2, 4, 8, then every multiple of 8 up to the largest) over
static input buffers; each step copies its inputs into the buffers of the smallest bucket that
holds the batch and replays that graph. A batch larger than the largest bucket, or one whose
block tables are wider than the buffers, runs eagerly (`run` returns None).

Padding rows (bucket size - batch size) read token 0 at position 0, write their key/value into
slot 0 of the pad block (a KV block the runner allocates beyond the pool's, never handed to a
sequence) and attend to that one slot: they cannot touch a real sequence's cache, and their
outputs are dropped.

The capture call is behind a seam (`GraphBackend`): `CudaGraphBackend` records real CUDA
graphs; tests pass a backend that "replays" by calling the forward function again on the same
static buffers, which exercises the bucketing, padding and buffer reuse on CPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to max_batch (which is always the last bucket)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes + [max_batch]))


@dataclass
class StaticInputs:
    """Views of the static buffers at one bucket size: what the captured forward reads."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64: cache slot of each token's key/value
    block_tables: torch.Tensor  # [N, max_blocks] (index dtype), padded with the pad block
    context_lens: torch.Tensor  # [N] (index dtype): tokens in the cache, this one included


class GraphBackend(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record fn (which reads only static buffers); the result replays it and returns its output."""
        ...


class CudaGraphBackend:
    """torch.cuda.CUDAGraph capture; all graphs share one memory pool (captured largest first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up outside the graph: kernel compilation, library workspaces
            fn()
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()
        torch.cuda.synchronize(self.device)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class EagerReplayBackend:
    """Not CUDA graphs: "replays" by calling the function again over the same static buffers. For
    CPU runs of the bookkeeping (tests, tools/gpu_check.py --device cpu); same results, no speed-up."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        fn()
        return fn


class DecodeGraphs:
    """Bucket choice, padding and static buffers for decode steps, around captured forwards.

    forward(inputs) -> hidden [N, H] is called at capture time with the static views of
    each bucket (N = bucket size) and must read nothing else that changes between steps."""

    def __init__(self, forward: Callable[[StaticInputs], torch.Tensor], *, max_blocks: int, block_size: int,
                 pad_block: int, device: torch.device, index_dtype: torch.dtype, backend: GraphBackend,
                 buckets: list[int]):
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive sizes, got {buckets}")
        self.buckets = sorted(set(buckets))
        self.max_batch = self.buckets[-1]
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.pad_block = pad_block
        self._forward = forward
        self._backend = backend
        n, pin = self.max_batch, device.type == "cuda"
        self._buffers = StaticInputs(
            input_ids=torch.zeros(n, dtype=torch.long, device=device),
            positions=torch.zeros(n, dtype=torch.long, device=device),
            slot_mapping=torch.zeros(n, dtype=torch.long, device=device),
            block_tables=torch.zeros(n, max_blocks, dtype=index_dtype, device=device),
            context_lens=torch.ones(n, dtype=index_dtype, device=device),
        )
        # host staging of the same shapes (pinned on CUDA: the copies run asynchronously)
        self._host = StaticInputs(*(torch.zeros_like(t, device="cpu").pin_memory() if pin
                                    else torch.zeros_like(t, device="cpu") for t in vars(self._buffers).values()))
        # on CUDA the copies out of the staging buffers are asynchronous: the next step waits for
        # them (this event) before it overwrites the staging buffers
        self._copied = torch.cuda.Event() if pin else None
        self._graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self.replays: Counter[int] = Counter()  # bucket -> steps replayed
        self.padded_rows = 0  # padding rows run so far (wasted work)
        self.eager_steps = 0  # decode steps that did not fit any bucket

    def view(self, size: int) -> StaticInputs:
        return StaticInputs(*(t[:size] for t in vars(self._buffers).values()))

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket >= batch, or None when the batch is larger than all of them."""
        return next((b for b in self.buckets if b >= batch), None)

    def capture(self) -> None:
        """Record one graph per bucket, the largest first (the smaller ones reuse its memory)."""
        self._fill_padding(0, self.max_batch)
        self._copy_in(self.max_batch)
        for size in reversed(self.buckets):
            inputs = self.view(size)
            self._graphs[size] = self._backend.capture(lambda inputs=inputs: self._forward(inputs))

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor | None:
        """Hidden states [B, H] of one decode token per sequence (position p, blocks as listed), or
        None when this batch cannot be replayed (the caller runs it eagerly)."""
        b = len(token_ids)
        size = self.bucket(b)
        if b == 0 or size is None or size not in self._graphs or any(len(t) > self.max_blocks for t in block_tables):
            self.eager_steps += 1
            return None
        h, bs = self._host, self.block_size
        if self._copied is not None:
            self._copied.synchronize()
        h.input_ids[:b] = torch.tensor(token_ids)
        h.positions[:b] = torch.tensor(positions)
        h.context_lens[:b] = h.positions[:b] + 1
        h.slot_mapping[:b] = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions,
                                                                                     strict=True)])
        rows = h.block_tables[:b]
        rows.fill_(self.pad_block)
        for i, t in enumerate(block_tables):
            rows[i, : len(t)] = torch.tensor(t)
        self._fill_padding(b, size)
        self._copy_in(size)
        self.replays[size] += 1
        self.padded_rows += size - b
        return self._graphs[size]()[:b]

    def _fill_padding(self, start: int, end: int) -> None:
        h = self._host
        h.input_ids[start:end] = 0
        h.positions[start:end] = 0
        h.slot_mapping[start:end] = self.pad_block * self.block_size
        h.block_tables[start:end] = self.pad_block
        h.context_lens[start:end] = 1

    def _copy_in(self, size: int) -> None:
        for dst, src in zip(vars(self._buffers).values(), vars(self._host).values(), strict=True):
            dst[:size].copy_(src[:size], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
