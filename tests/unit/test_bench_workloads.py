"""Benchmark workloads and arrival processes: the lengths, sharing and timing they promise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tools.bench.workloads import (
    FIRST_ORDINARY_ID,
    ModelShape,
    WorkloadSpec,
    arrival_offsets,
    describe,
    make_workload,
    permute_tokens,
)

SHAPE = ModelShape(vocab_size=1000, max_model_len=1024, bos_token_id=1)
SPEC = WorkloadSpec()


def test_fixed_lengths_are_exact_and_start_with_bos():
    reqs = make_workload("fixed", 10, SPEC, SHAPE, seed=0)
    assert {len(r.prompt) for r in reqs} == {SPEC.fixed_input}
    assert {r.output_len for r in reqs} == {SPEC.fixed_output}
    assert all(r.prompt[0] == 1 for r in reqs)
    assert all(FIRST_ORDINARY_ID <= t < SHAPE.vocab_size for r in reqs for t in r.prompt[1:])
    assert len({tuple(r.prompt) for r in reqs}) == 10  # distinct prompts


def test_mixed_lengths_are_long_tailed_and_bounded():
    reqs = make_workload("mixed", 2000, SPEC, SHAPE, seed=0)
    ins = np.array([len(r.prompt) for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert ins.min() >= SPEC.mixed_input_range[0] and ins.max() <= SPEC.mixed_input_range[1]
    assert outs.min() >= SPEC.mixed_output_range[0] and outs.max() <= SPEC.mixed_output_range[1]
    assert np.median(ins) == pytest.approx(SPEC.mixed_input_median, rel=0.1)
    assert np.median(outs) == pytest.approx(SPEC.mixed_output_median, rel=0.1)
    # long tail: mean well above median, the largest several times the median
    assert ins.mean() > 1.3 * np.median(ins) and ins.max() > 4 * np.median(ins)
    assert (ins + outs).max() <= SHAPE.max_model_len


def test_workloads_are_seeded():
    a = make_workload("mixed", 20, SPEC, SHAPE, seed=3)
    assert a == make_workload("mixed", 20, SPEC, SHAPE, seed=3)
    assert a != make_workload("mixed", 20, SPEC, SHAPE, seed=4)


def test_prefix_workload_shares_one_system_prompt():
    reqs = make_workload("prefix", 8, SPEC, SHAPE, seed=0)
    system = reqs[0].prompt[: SPEC.prefix_len]
    assert all(r.prompt[: SPEC.prefix_len] == system for r in reqs)
    questions = [tuple(r.prompt[SPEC.prefix_len :]) for r in reqs]
    assert len(set(questions)) == 8
    assert all(SPEC.question_range[0] <= len(q) <= SPEC.question_range[1] for q in questions)
    assert {r.output_len for r in reqs} == {SPEC.prefix_output}


def test_workloads_shrink_to_a_short_model():
    short = ModelShape(vocab_size=400, max_model_len=256, bos_token_id=None)
    for name in ("fixed", "mixed", "prefix"):
        reqs = make_workload(name, 50, SPEC, short, seed=0)
        assert all(len(r.prompt) + r.output_len <= 256 for r in reqs), name
        assert all(r.prompt[0] != 1 or name != "fixed" for r in reqs)  # no BOS without one


def test_permuted_tokens_keep_lengths_and_shared_prefix_but_share_nothing_else():
    reqs = make_workload("prefix", 4, SPEC, SHAPE, seed=0)
    a, b = permute_tokens(reqs, SHAPE, 1), permute_tokens(reqs, SHAPE, 2)
    assert [len(r.prompt) for r in a] == [len(r.prompt) for r in reqs]
    assert [r.output_len for r in a] == [r.output_len for r in reqs]
    assert all(r.prompt[: SPEC.prefix_len] == a[0].prompt[: SPEC.prefix_len] for r in a)
    assert a[0].prompt[0] == 1  # BOS stays
    # the first full KV block (16 tokens) differs between runs: no cross-run prefix hit
    assert a[0].prompt[:16] != reqs[0].prompt[:16] and a[0].prompt[:16] != b[0].prompt[:16]


def test_all_at_once_arrivals():
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert arrival_offsets(0, 1.0) == []


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals_have_the_rate_and_burstiness(burstiness):
    offsets = arrival_offsets(20001, rate=5.0, burstiness=burstiness, seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
    # gamma with shape k: coefficient of variation 1/sqrt(k) (Poisson: 1)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_bad_arrivals_are_refused():
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, burstiness=0)
    with pytest.raises(ValueError):
        make_workload("sharegpt", 3, SPEC, SHAPE, 0)


def test_describe():
    d = describe(make_workload("fixed", 3, SPEC, SHAPE, 0))
    assert d["num_requests"] == 3 and d["input_len"]["max"] == SPEC.fixed_input


def test_code_windows_are_held_out_source_of_the_requested_length(tmp_path):
    from tokenizers import Tokenizer

    from tests.helpers.tokenizers import make_tokenizer_dir
    from tools.bench.workloads import heldout_sources

    make_tokenizer_dir(tmp_path)
    shape = ModelShape(
        vocab_size=400, max_model_len=512, bos_token_id=1, tokenizer_path=str(tmp_path / "tokenizer.json")
    )
    spec = WorkloadSpec(code_input=48, code_output=16)
    reqs = make_workload("code", 5, spec, shape, seed=0)
    assert [len(r.prompt) for r in reqs] == [48] * 5 and {r.output_len for r in reqs} == {16}
    assert all(r.prompt[0] == 1 for r in reqs)
    assert reqs == make_workload("code", 5, spec, shape, seed=0)
    assert reqs != make_workload("code", 5, spec, shape, seed=1)
    text = Tokenizer.from_file(shape.tokenizer_path).decode(reqs[0].prompt[1:])
    sources = heldout_sources()
    assert any(text[:30] in p.read_text(encoding="utf-8", errors="replace") for p in sources)
    with pytest.raises(ValueError):
        make_workload("code", 1, spec, ModelShape(400, 512, 1), seed=0)  # no tokenizer


def test_held_out_split_is_the_demo_models():
    import sysconfig
    from pathlib import Path

    from tools import train_demo
    from tools.bench.workloads import heldout_sources
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = heldout_sources()
    assert sources and all(train_demo.is_heldout(p.relative_to(root).as_posix()) for p in sources)
