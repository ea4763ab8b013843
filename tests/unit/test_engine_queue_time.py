"""Queue time: how long a request waited in the engine before it was first scheduled.

The workers observe it (`tandem_request_queue_time_seconds`) from `RequestOutput.queue_seconds`.
"""

from __future__ import annotations

import time

import pytest

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers.models import make_tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return LLMEngine(EngineConfig(model=str(ckpt), num_blocks=64, block_size=8, max_num_seqs=1))


def run(engine: LLMEngine) -> dict[str, list]:
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def test_a_request_behind_a_full_batch_reports_its_wait(engine):
    engine.add_request("first", [1, *range(5, 20)], GREEDY)
    engine.add_request("second", [1, *range(30, 40)], GREEDY)  # max_num_seqs=1: waits for "first"
    t0 = time.monotonic()
    outs = run(engine)
    elapsed = time.monotonic() - t0
    first = {o.queue_seconds for o in outs["first"]}
    second = {o.queue_seconds for o in outs["second"]}
    assert len(first) == 1 and len(second) == 1  # set once, at the first scheduling, then kept
    (q1,), (q2,) = first, second
    assert 0 <= q1 < q2 <= elapsed + 0.1  # "second" waited while "first" ran all its steps


def test_imported_kv_never_queued(engine):
    assert engine.reserve("imported", 9)
    engine.import_kv("imported", _zeros_kv(engine, 9), layer_start=0)
    assert engine.add_prefilled("imported", [1, *range(50, 58)], 7, GREEDY) is None
    outs = run(engine)
    assert {o.queue_seconds for o in outs["imported"]} == {None}


def _zeros_kv(engine: LLMEngine, num_tokens: int):
    import torch

    mc = engine.model_config
    return torch.zeros(mc.num_layers, 2, num_tokens, mc.num_kv_heads, mc.head_dim)
