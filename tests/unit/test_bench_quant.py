"""`make bench-quant`'s same-KV-budget run: the budget holds N bf16 sequences, and each mode
decodes as many sequences as that budget holds in its own KV format, all of them at once."""

from __future__ import annotations

import pytest

from tests.helpers.models import make_tiny_checkpoint
from tools.bench import quant


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # head_dim 32: the smallest an 8-bit cache takes
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bench-q"), hidden=128, heads=4, kv_heads=2, tie=True)


def test_each_mode_runs_the_sequences_its_share_of_the_budget_holds(tiny, monkeypatch):
    ran: dict[str, int] = {}
    real = quant.interleaved_throughput

    def spy(engines, prompts, steps, counts=None):
        for mode, engine in engines.items():
            ran[mode] = engine.config.max_num_seqs
        return real(engines, prompts, steps, counts)

    monkeypatch.setattr(quant, "interleaved_throughput", spy)
    rows = {}
    for mode in quant.MODES:
        engine = quant._engine(str(tiny), mode, 4, 16)
        rows[mode] = {"kv_bytes_per_block": engine.runner.kv_bytes_per_block(quant.BLOCK)}
    prompts = [[1, *range(3 + i, 3 + i + 20)] for i in range(8)]  # distinct: no prefix shared
    quant.budget_throughput(str(tiny), rows, prompts, steps=3, bf16_seqs=4)

    per_seq = -(-(len(prompts[0]) + 3 + 2) // quant.BLOCK)
    budget = 4 * per_seq * rows["bf16"]["kv_bytes_per_block"]
    for mode, r in rows.items():
        assert r["budget_bytes"] == budget
        assert r["budget_seqs"] == budget // r["kv_bytes_per_block"] // per_seq == ran[mode]
        assert r["budget_tok_s"] > 0
    assert rows["bf16"]["budget_seqs"] == rows["int8 weights"]["budget_seqs"] == 4
    # an 8-bit cache: 1 + 1/32 bytes per element against 2, so nearly twice the sequences
    assert rows["fp8 KV"]["budget_seqs"] == rows["int8 KV"]["budget_seqs"] == 7


def test_interleaved_throughput_runs_each_engine_its_own_count(tiny):
    engines = {mode: quant._engine(str(tiny), mode, 8, 64) for mode in ("bf16", "fp8 KV")}
    added: dict[str, list[str]] = {mode: [] for mode in engines}
    for mode, engine in engines.items():
        real = engine.add_request
        engine.add_request = lambda rid, *a, _real=real, _m=mode, **kw: (added[_m].append(rid), _real(rid, *a, **kw))[1]
    prompts = [[1, *range(3, 3 + 12)] for _ in range(5)]
    rates = quant.interleaved_throughput(engines, prompts, 2, {"bf16": 2})
    assert len(added["bf16"]) == 2 and len(added["fp8 KV"]) == 5  # no count: every prompt
    assert len(rates["bf16"]) == len(rates["fp8 KV"]) == 2 and min(rates["bf16"] + rates["fp8 KV"]) > 0
    assert all(not e.has_unfinished() for e in engines.values())


def test_the_same_memory_run_refuses_to_repeat_prompts(tiny):
    """A repeated prompt would share its KV blocks through the prefix cache, so the 8-bit modes'
    extra sequences would cost less memory and bandwidth than a real request's."""
    rows = {mode: {"kv_bytes_per_block": quant._engine(str(tiny), mode, 4, 16).runner.kv_bytes_per_block(quant.BLOCK)}
            for mode in quant.MODES}
    with pytest.raises(ValueError, match="distinct prompts"):
        quant.budget_throughput(str(tiny), rows, [[1, *range(3, 23)]] * 4, steps=3, bf16_seqs=4)
