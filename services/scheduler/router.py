"""Routing policy: which decode worker, and which prefill worker or none, serves a prompt.

Decode worker: one whose free KV blocks fit the prompt, then the shortest queue (running +
waiting), then the most free blocks. Prefill worker: the longest cached prefix, then the
shortest queue. The cached prefix is estimated from what the scheduler itself routed: each
worker has a bounded memory of the prompt block hashes it was sent (shared/prefix.py hashes,
the same chain hashes the engine's prefix cache uses). The estimate is optimistic (the worker
may have evicted blocks since) and is only used to rank workers.

Conditional disaggregation: with no healthy prefill worker, or fewer uncached prompt tokens on
the chosen decode worker than `disagg_min_tokens`, the decode worker prefills locally.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.prefix import block_hashes

if TYPE_CHECKING:
    from .pool import WorkerHandle, WorkerPool


class PrefixMemory:
    """An LRU set of block hashes a worker has (probably) cached."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def num_cached_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt (given by its chain hashes) are remembered."""
        n = 0
        for h in hashes:
            if h not in self._hashes:
                break
            n += 1
        return n

    def add(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self._capacity:
            self._hashes.popitem(last=False)


@dataclass
class Route:
    """Where one request goes."""

    decode: WorkerHandle
    prefill: WorkerHandle | None  # None: the decode worker prefills locally
    num_blocks: int  # KV blocks the prompt needs
    block_hashes: list[int]  # chain hashes of the prompt's full blocks
    cached_tokens_estimate: int  # on the worker that prefills
    prefill_pending: bool = False  # counted in prefill.num_inflight until the first token


class NoDecodeWorker(Exception):
    """No healthy decode worker."""


class Router:
    def __init__(self, pool: WorkerPool, *, disagg_min_tokens: int):
        self._pool = pool
        self._disagg_min_tokens = disagg_min_tokens

    def route(self, prompt_token_ids: Sequence[int], *, full_prefill: bool = False) -> Route:
        """`full_prefill`: the request computes every prompt token on its decode worker (it asks
        for prompt logprobs): no prefill peer, no cached tokens."""
        decodes = self._pool.healthy("decode")
        if not decodes:
            raise NoDecodeWorker("no healthy decode worker")
        block_size = decodes[0].block_size
        hashes = block_hashes(prompt_token_ids, block_size)
        num_blocks = -(-len(prompt_token_ids) // block_size)
        decode = min(decodes, key=lambda w: (w.free_blocks < num_blocks, w.queue_length, -w.free_blocks))
        if full_prefill:
            return Route(decode, None, num_blocks, hashes, 0)
        local_cached = decode.prefix.num_cached_blocks(hashes) * block_size
        prefill = None
        cached = local_cached
        prefills = self._pool.healthy("prefill")
        if prefills and len(prompt_token_ids) - local_cached >= self._disagg_min_tokens:
            matched = {w.address: w.prefix.num_cached_blocks(hashes) for w in prefills}
            prefill = min(prefills, key=lambda w: (-matched[w.address], w.queue_length))
            cached = matched[prefill.address] * block_size
        return Route(decode, prefill, num_blocks, hashes, min(cached, len(prompt_token_ids) - 1))

    def begin(self, route: Route) -> None:
        """Count a routed request against its workers until `prefill_done` / `end`."""
        route.decode.num_inflight += 1
        route.decode.num_pending_blocks += route.num_blocks
        route.decode.prefix.add(route.block_hashes)  # decode caches the prompt's full blocks too
        if route.prefill is not None:
            route.prefill.num_inflight += 1
            route.prefill.prefix.add(route.block_hashes)
            route.prefill_pending = True

    def prefill_done(self, route: Route) -> None:
        """The first token came back: the prefill worker is done with this request."""
        if route.prefill is not None and route.prefill_pending:
            route.prefill.num_inflight -= 1
            route.prefill_pending = False

    def end(self, route: Route) -> None:
        self.prefill_done(route)
        route.decode.num_inflight -= 1
