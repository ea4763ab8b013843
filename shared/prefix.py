"""Chain hashes of full KV blocks, shared by the engine (prefix cache) and the scheduler
(routing by longest cached prefix). No torch, so the scheduler can use it.

A block's hash covers its tokens and the hash of the block before it, so equal hashes mean
equal whole prefixes. Python's hash of a tuple of ints does not depend on PYTHONHASHSEED,
so the values agree across processes.
"""

from __future__ import annotations

from collections.abc import Sequence

ROOT_HASH = 0x7A4D3  # the "parent" of the first block


def hash_block(parent: int, tokens: Sequence[int]) -> int:
    return hash((parent, *tokens))


def block_hashes(token_ids: Sequence[int], block_size: int, start_hashes: Sequence[int] = ()) -> list[int]:
    """Hashes of every full block of `token_ids`; `start_hashes` are already known leading ones."""
    hashes = list(start_hashes)
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[i: i + block_size])
        hashes.append(parent)
    return hashes
