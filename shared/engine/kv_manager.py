"""Per-request block tables over the block pool, and prefix-cache lookups.

Check-then-act: `allocate_slots` either reserves every block a step needs or nothing.
Knows nothing of scheduling policy or tensors.
"""

from __future__ import annotations

from shared.prefix import block_hashes

from .block_pool import Block, BlockPool
from .request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.tables: dict[str, list[Block]] = {}
        self._num_hashed: dict[str, int] = {}  # full blocks of a request already registered in the cache
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.tables.get(request_id, [])]

    def get_computed_blocks(self, req: Request) -> tuple[list[Block], int]:
        """Longest cached prefix of the prompt, as blocks and a token count. At least one
        prompt token is left to compute, since its logits give the first output token."""
        req.block_hashes = block_hashes(req.all_token_ids, self.block_size, req.block_hashes)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for h in req.block_hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[Block] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens of `req` (after `computed` cached blocks)."""
        table = self.tables.get(req.request_id, [])
        computed = computed or []
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        needed = -(-total // self.block_size) - len(table) - len(computed)
        # cached-free blocks we are about to touch leave the free queue too
        reclaimed = sum(1 for b in computed if b.ref_count == 0)
        if needed + reclaimed > self.pool.num_free:
            return False
        if computed:
            self.pool.touch(computed)
            table = table + computed
        if needed > 0:
            table = table + self.pool.allocate(needed)
        self.tables[req.request_id] = table
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's computed full blocks in the prefix cache."""
        table = self.tables.get(req.request_id)
        if not table or not self.pool.enable_caching:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(table))
        done = self._num_hashed.get(req.request_id, 0)
        if num_full <= done:
            return
        req.block_hashes = block_hashes(req.all_token_ids[: num_full * self.block_size], self.block_size,
                                        req.block_hashes[:num_full])
        for i in range(done, num_full):
            self.pool.cache(table[i], req.block_hashes[i])
        self._num_hashed[req.request_id] = num_full

    def fork(self, src_id: str, dst_id: str, num_tokens: int) -> tuple[int, int] | None:
        """A block table for `dst_id` holding `src_id`'s first num_tokens tokens: the full blocks
        shared (one more reference each), the partly filled one, if any, a fresh block. Returns
        (source block id, fresh block id) for the caller to copy the partial block's contents,
        (-1, -1) when there is none; None when no block is free (nothing changed then)."""
        table = self.tables.get(src_id, [])
        full, partial = divmod(num_tokens, self.block_size)
        if partial and self.pool.num_free < 1:
            return None
        shared = table[:full]
        self.pool.touch(shared)
        if not partial:
            self.tables[dst_id] = shared
            return -1, -1
        (fresh,) = self.pool.allocate(1)
        self.tables[dst_id] = shared + [fresh]
        return table[full].block_id, fresh.block_id

    def move(self, src_id: str, dst_id: str) -> None:
        """`dst_id` takes over `src_id`'s blocks (its own, if any, are freed first)."""
        self.free(dst_id)
        self.tables[dst_id] = self.tables.pop(src_id, [])
        self._num_hashed.pop(src_id, None)

    def free(self, request_id: str) -> None:
        table = self.tables.pop(request_id, None)
        self._num_hashed.pop(request_id, None)
        if table:
            self.pool.free(reversed(table))

    def truncate(self, req: Request, num_tokens: int) -> None:
        """Drop blocks past `num_tokens` (rejected speculative positions)."""
        table = self.tables.get(req.request_id, [])
        keep = -(-num_tokens // self.block_size)
        if keep < len(table):
            self.pool.free(reversed(table[keep:]))
            self.tables[req.request_id] = table[:keep]
            self._num_hashed[req.request_id] = min(self._num_hashed.get(req.request_id, 0), num_tokens // self.block_size)
