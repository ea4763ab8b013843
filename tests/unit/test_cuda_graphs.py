"""The decode CUDA-graph bookkeeping (buckets, padding, static buffers, eager fallback), on CPU:
the capture call sits behind a seam, and the test backend "replays" by running the captured
function again over the same static buffers, as a real graph would read them."""

from __future__ import annotations

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.cuda_graphs import DecodeGraphs, StaticInputs, default_buckets
from tests.helpers.models import hf_greedy, load_hf, make_tiny_checkpoint


class ReplayAgain:
    """A GraphBackend for CPU: capture records the function; replay calls it again."""

    def __init__(self):
        self.captured: list[int] = []  # sizes, in capture order
        self.replayed: list[int] = []

    def capture(self, fn):
        out = fn()
        size = out.shape[0]
        self.captured.append(size)

        def replay():
            self.replayed.append(size)
            return fn()

        return replay


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(6) == [1, 2, 4, 6]
    assert default_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]


def make_graphs(buckets=(1, 2, 4, 8), max_blocks=4, block_size=4, pad_block=99):
    seen: list[StaticInputs] = []

    def forward(inputs: StaticInputs) -> torch.Tensor:
        seen.append(inputs)  # the "model": echoes what it read, one row per token
        return torch.stack([inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.context_lens,
                            inputs.block_tables[:, 0]], dim=1)

    backend = ReplayAgain()
    graphs = DecodeGraphs(forward, max_blocks=max_blocks, block_size=block_size, pad_block=pad_block,
                          device=torch.device("cpu"), index_dtype=torch.long, backend=backend, buckets=list(buckets))
    graphs.capture()
    return graphs, backend, seen


def test_capture_largest_first_and_bucket_choice():
    graphs, backend, _ = make_graphs()
    assert backend.captured == [8, 4, 2, 1]  # the smaller graphs share the largest one's memory pool
    assert [graphs.bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, None]


def test_replay_pads_to_the_bucket_and_trims_the_output():
    graphs, backend, seen = make_graphs()
    # three sequences: tokens 7, 8, 9 at positions 5, 0, 13 (block size 4)
    out = graphs.run([7, 8, 9], [5, 0, 13], [[3, 4], [6], [10, 11, 12, 13]])
    assert backend.replayed == [4]
    assert out.shape[0] == 3  # padding rows dropped
    assert out.tolist() == [[7, 5, 4 * 4 + 1, 6, 3], [8, 0, 6 * 4, 1, 6], [9, 13, 13 * 4 + 1, 14, 10]]
    inputs = seen[-1]  # what the replayed graph read: the bucket's padded view
    assert inputs.input_ids.shape[0] == 4
    assert inputs.slot_mapping[3].item() == 99 * 4  # padding writes into the pad block only
    assert inputs.context_lens[3].item() == 1 and (inputs.block_tables[3] == 99).all()
    assert inputs.block_tables[1].tolist() == [6, 99, 99, 99]  # unused table entries: the pad block
    assert graphs.padded_rows == 1 and graphs.replays[4] == 1


def test_static_buffers_are_reused():
    graphs, _, seen = make_graphs()
    graphs.run([1, 2], [0, 1], [[0], [1]])
    first = seen[-1].input_ids.data_ptr()
    graphs.run([3, 4, 5, 6, 7], [2, 2, 2, 2, 2], [[0]] * 5)
    graphs.run([8], [3], [[0]])
    assert {s.input_ids.data_ptr() for s in seen[-3:]} == {first}  # views of one buffer, never reallocated
    # a smaller batch after a larger one: rows past the new batch are padding again, not stale inputs
    graphs.run([9, 10, 11], [1, 1, 1], [[5]] * 3)
    assert seen[-1].input_ids.tolist() == [9, 10, 11, 0] and seen[-1].slot_mapping[3].item() == 99 * 4


def test_eager_fallback():
    graphs, backend, _ = make_graphs()
    assert graphs.run(list(range(9)), [0] * 9, [[0]] * 9) is None  # above the largest bucket
    assert graphs.run([1], [0], [[0, 1, 2, 3, 4]]) is None  # block table wider than the buffers
    assert graphs.run([], [], []) is None
    assert backend.replayed == [] and graphs.eager_steps == 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("graphs"), arch="mistral", sliding_window=16)
    hf = load_hf(path)
    prompts = [[1, *range(5, 45)], [1, 30, 31], [1, *range(100, 119)], [1, *range(200, 260)], [1, 7]]
    return path, prompts, [hf_greedy(hf, p, 20) for p in prompts]


def test_engine_with_replayed_graphs_matches_hf(checkpoint):
    """The engine's decode steps through the graph path (padding rows, static buffers, buckets
    1/2/4) give HF's greedy tokens; the pad block stays outside the pool."""
    path, prompts, refs = checkpoint
    engine = LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=8, max_num_batched_tokens=64,
                                    max_num_seqs=4))
    backend = ReplayAgain()
    graphs = engine.runner.enable_decode_graphs(4, engine.max_model_len, backend=backend)
    assert backend.captured == [4, 2, 1]
    assert engine.runner.pad_block == 64 and engine.runner.kv_cache.shape[2] == 65
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outputs = {i: [] for i in range(len(prompts))}
    pending, steps = list(enumerate(prompts)), 0
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:  # staggered joins: batch sizes change from step to step
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
        for out in engine.step():
            outputs[int(out.request_id)].extend(out.new_token_ids)
        steps += 1
    assert [outputs[i] for i in range(len(prompts))] == refs
    assert set(graphs.replays) == {1, 2, 4} and graphs.padded_rows > 0
    s = engine.stats()
    assert s.num_free_blocks == s.num_total_blocks == 64
