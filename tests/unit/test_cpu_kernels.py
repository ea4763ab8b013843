"""The C++ decode-attention kernel equals the pure-PyTorch paged attention it replaces."""

from __future__ import annotations

import pytest
import torch

from shared.engine.model import cpu_kernels
from shared.engine.model.attention import AttentionMetadata, DecodeGroup, paged_attention

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C++ toolchain to build the kernel")


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads,kv_heads", [(8, 4), (4, 4), (6, 1), (6, 2)])
@pytest.mark.parametrize("d", [16, 32, 64, 128])  # 32/64/128 take the vectorized path where the CPU has AVX2
def test_kernel_matches_torch_path(monkeypatch, window, heads, kv_heads, d):
    g = torch.Generator().manual_seed(0)
    nb, bs = 40, 4
    k_cache = torch.randn(nb, bs, kv_heads, d, generator=g)
    v_cache = torch.randn(nb, bs, kv_heads, d, generator=g)
    lens = torch.tensor([1, 5, 8, 9, 17, 30, 32])  # below, at and off multiples of 8
    tables = torch.stack([torch.randperm(nb, generator=g)[:8] for _ in lens])
    q = torch.randn(len(lens), heads, d, generator=g)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), prefills=[],
                             decodes=[DecodeGroup(0, tables, lens, int(lens.max()))], sliding_window=window)
    fast = paged_attention(q, k_cache, v_cache, meta, d ** -0.5)
    monkeypatch.setattr(cpu_kernels, "usable", lambda q: False)
    reference = paged_attention(q, k_cache, v_cache, meta, d ** -0.5)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [16, 32, 64])
def test_kernel_reads_half_precision_caches(monkeypatch, dtype, d):
    """A bf16/fp16 cache is read as is (float32 arithmetic): the result equals float32 attention
    over the same (rounded) values, up to the rounding of the output."""
    g = torch.Generator().manual_seed(1)
    nb, bs, heads, kv_heads = 40, 4, 6, 2
    k_cache = torch.randn(nb, bs, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(nb, bs, kv_heads, d, generator=g).to(dtype)
    lens = torch.tensor([1, 7, 8, 9, 30])
    tables = torch.stack([torch.randperm(nb, generator=g)[:8] for _ in lens])
    q = torch.randn(len(lens), heads, d, generator=g).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), prefills=[],
                             decodes=[DecodeGroup(0, tables, lens, int(lens.max()))], sliding_window=None)
    fast = paged_attention(q, k_cache, v_cache, meta, d ** -0.5)
    assert fast.dtype == dtype
    monkeypatch.setattr(cpu_kernels, "usable", lambda q: False)
    reference = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, d ** -0.5)
    torch.testing.assert_close(fast.float(), reference, atol=1e-2, rtol=1e-2)


def test_fused_elementwise_ops_match_torch():
    """rms_norm, silu_and_mul and rope_ (float32) equal the PyTorch formulas the model otherwise uses."""
    import torch.nn.functional as F

    from shared.engine.model.llama import apply_rope

    m = cpu_kernels.load()
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(37, 24, generator=g), torch.randn(24, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(m.rms_norm(x, w, 1e-6), ref, atol=1e-5, rtol=1e-5)
    gate, up = torch.randn(37, 61, generator=g) * 30, torch.randn(37, 61, generator=g)  # large |x|: exp clamps
    torch.testing.assert_close(m.silu_and_mul(gate, up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)
    q, k = torch.randn(5, 6, 32, generator=g), torch.randn(5, 2, 32, generator=g)
    angles = torch.randn(5, 16, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]
    q_ref, k_ref = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    m.rope_(q, k, cos[:, 0].contiguous(), sin[:, 0].contiguous())
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)


def test_kernel_rejects_tables_that_point_outside_the_cache():
    """A bad context length or block id is an error, never a read outside the cache."""
    k = v = torch.zeros(4, 4, 2, 32)
    q = torch.zeros(1, 2, 32)
    m = cpu_kernels.load()
    with pytest.raises(RuntimeError, match="context length"):
        m.paged_decode_attention(q, k, v, torch.tensor([[0, 1]]), torch.tensor([9]), 1.0, 0)
    with pytest.raises(RuntimeError, match="block id"):
        m.paged_decode_attention(q, k, v, torch.tensor([[0, 7]]), torch.tensor([6]), 1.0, 0)
    m.paged_decode_attention(q, k, v, torch.tensor([[0, 7]]), torch.tensor([4]), 1.0, 0)  # block 7 unused: fine


def test_a_start_that_compiles_the_kernels_says_so(monkeypatch, caplog):
    assert cpu_kernels._built()  # loaded above: in torch's extension cache
    monkeypatch.setattr(cpu_kernels, "_built", lambda: False)  # as on a first start
    with caplog.at_level("INFO", logger=cpu_kernels.__name__):
        assert cpu_kernels.load.__wrapped__() is not None
    assert any("compiling the CPU kernels" in r.getMessage() for r in caplog.records)


def test_a_build_lock_left_by_a_killed_build_does_not_block_later_starts(tmp_path, caplog):
    # torch waits while `lock` exists; a build killed mid-way (a worker SIGKILLed on its first
    # start) leaves it, and without Tandem's own lock every later start would hang
    (tmp_path / "lock").touch()
    with caplog.at_level("WARNING", logger=cpu_kernels.__name__), cpu_kernels._exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert any("interrupted build" in r.getMessage() for r in caplog.records)
    with cpu_kernels._exclusive_build(tmp_path):  # released: taken again at once
        pass


def test_a_build_lock_held_by_a_live_build_is_left_alone(tmp_path):
    with open(tmp_path / "lock", "w"), cpu_kernels._exclusive_build(tmp_path):
        assert (tmp_path / "lock").exists()


needs_small_linear = pytest.mark.skipif(cpu_kernels.small_linear_width() == 0, reason="no vector unit for small_linear")


@needs_small_linear
@pytest.mark.parametrize(("k", "n"), [(192, 512), (64, 7), (512, 192), (32, 4096)])
def test_small_linear_matches_torch_and_each_row_is_independent_of_the_others(k, n):
    """A row's result is the same bits whatever rows share its call: verifying k drafts (k + 1
    rows) scores each position as a one-row decode step does."""
    torch.manual_seed(0)
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(8, k)
    for bias in (b, None):
        for m in range(0, cpu_kernels.SMALL_LINEAR_MAX_ROWS + 1):
            y = cpu_kernels.small_linear(x[:m], w, bias)
            assert y.shape == (m, n)
            torch.testing.assert_close(y, torch.nn.functional.linear(x[:m], w, bias), atol=1e-4, rtol=1e-4)
            for row in range(m):
                assert torch.equal(y[row], cpu_kernels.small_linear(x[row: row + 1], w, bias)[0])


@needs_small_linear
def test_the_models_linear_takes_the_kernel_for_a_few_float32_rows_only(monkeypatch):
    from shared.engine.model.llama import Linear

    lin = Linear(cpu_kernels.small_linear_width() * 2, 5)
    calls = []
    real = cpu_kernels.small_linear
    monkeypatch.setattr(cpu_kernels, "small_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, 3, cpu_kernels.SMALL_LINEAR_MAX_ROWS, cpu_kernels.SMALL_LINEAR_MAX_ROWS + 1):
        x = torch.randn(rows, lin.in_features)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert calls == [1, 3, cpu_kernels.SMALL_LINEAR_MAX_ROWS]  # more rows: torch's matrix product
    odd = Linear(cpu_kernels.small_linear_width() + 1, 5)  # K not a multiple of the vector width
    torch.testing.assert_close(odd(x := torch.randn(2, odd.in_features)), torch.nn.functional.linear(x, odd.weight, odd.bias))
    assert len(calls) == 3
