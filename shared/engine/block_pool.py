"""The pool of KV cache blocks: free queue, reference counts, prefix-hash -> block map.

A block with ref_count 0 sits in the free queue (least recently freed first). If it also
carries a hash it is "cached-free": still findable by its prefix hash and reusable at no
cost until allocation evicts it. Knows nothing of requests or tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        # insertion order = eviction order (LRU); values unused
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, Block] = {}
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, including cached-free)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: int) -> Block | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def allocate(self, n: int) -> list[Block]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")  # callers check first
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict from the prefix cache
                if self._cached.get(block.hash) is block:
                    del self._cached[block.hash]
                block.hash = None
                self.num_evictions += 1
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on (cached) blocks, pulling them out of the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each. Pass a request's blocks tail first so that, among
        equally old blocks, the end of a prefix is evicted before its start."""
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"{block} freed twice")
            if block.ref_count == 0:
                self._free[block.block_id] = None

    def cache(self, block: Block, block_hash: int) -> None:
        """Register a full block under its prefix hash (first writer wins)."""
        if not self.enable_caching or block.hash is not None:
            return
        if block_hash in self._cached:
            return  # another block holds the same content; this one stays uncached
        block.hash = block_hash
        self._cached[block_hash] = block

    def reset_cache(self) -> None:
        for block in self._cached.values():
            block.hash = None
        self._cached.clear()
