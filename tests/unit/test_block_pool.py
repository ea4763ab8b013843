"""Block pool and KV manager without a model: ref counts, prefix hits, LRU eviction."""

from __future__ import annotations

from shared.engine.block_pool import BlockPool
from shared.engine.kv_manager import KVCacheManager
from shared.engine.request import Request
from shared.params import SamplingParams
from shared.prefix import block_hashes


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), 0)


def compute_all(kv: KVCacheManager, r: Request) -> int:
    blocks, cached = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - cached, blocks)
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)
    return cached


def test_chain_hash_depends_on_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[1] != b[1]  # same second block, different prefix
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == a  # partial block not hashed


def test_shared_prefix_is_reused_with_ref_counts():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", list(range(12)))
    assert compute_all(kv, a) == 0
    b = req("b", list(range(8)) + [99, 98, 97])
    assert compute_all(kv, b) == 8
    shared = kv.tables["a"][:2]
    assert kv.tables["b"][:2] == shared and all(blk.ref_count == 2 for blk in shared)
    kv.free("a")
    assert all(blk.ref_count == 1 for blk in shared)
    kv.free("b")
    assert kv.num_free_blocks == 10 and kv.pool.num_cached == 3


def test_full_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    compute_all(kv, req("a", list(range(8))))
    kv.free("a")
    again = req("b", list(range(8)))
    _, cached = kv.get_computed_blocks(again)
    assert cached == 4  # the last block is recomputed so the last token yields logits


def test_cached_free_blocks_are_evicted_least_recent_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    compute_all(kv, req("old", [1, 2, 3, 4]))
    kv.free("old")
    compute_all(kv, req("new", [5, 6, 7, 8]))
    kv.free("new")
    assert kv.pool.num_cached == 4
    kv.allocate_slots(req("x", [0, 0]), 2)  # needs one block: evicts the oldest, the tail of "old" first
    assert kv.get_computed_blocks(req("q", [5, 6, 7, 8, 0]))[1] == 4
    assert kv.get_computed_blocks(req("q2", [1, 2, 3, 4, 0]))[1] == 2


def test_allocate_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    r = req("a", list(range(20)))
    assert not kv.allocate_slots(r, 20)
    assert kv.num_free_blocks == 3 and "a" not in kv.tables


def test_double_free_is_an_error():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    try:
        pool.free([b])
    except RuntimeError as e:
        assert "freed twice" in str(e)
    else:
        raise AssertionError("double free went unnoticed")
