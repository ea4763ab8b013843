"""TANDEM_DRAFT_MODEL: the decode worker's settings for a draft model run in its own process,
and the in-process draft answering the Draft calls as the service does."""

from __future__ import annotations

import pytest

from services.common.draft_calls import InProcessDraft
from services.decode.draft_client import DraftProposer, build_draft_engine
from shared.config import ConfigError, WorkerConfig, from_env
from shared.engine.spec import ProposalRequest
from shared.params import SamplingParams
from shared.telemetry import TelemetryConfig, setup_telemetry
from tests.helpers.models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("draft-in-worker"))


def _config(**overrides) -> WorkerConfig:
    return from_env(WorkerConfig, env={}, overrides={"model": "target-dir", **overrides})


def test_a_draft_model_turns_speculation_on_and_sizes_its_own_engine():
    c = _config(draft_model="draft-dir", draft_kv_cache_memory=64 << 20, quantization="int8", num_blocks=99)
    assert c.speculation == "draft"
    kw = c.draft_engine_kwargs()
    assert kw["model"] == "draft-dir" and kw["kv_cache_memory"] == 64 << 20
    # the worker's device and element type; its own KV memory, no prefix sharing, no quantization
    assert (kw["device"], kw["dtype"]) == (c.device, c.dtype)
    assert kw["num_blocks"] is None and kw["quantization"] == "none" and kw["enable_prefix_caching"] is False


@pytest.mark.parametrize("overrides, names", [
    (dict(draft_model="d", draft_addr="127.0.0.1:5"), "TANDEM_DRAFT_MODEL"),
    (dict(spec_proposer="draft"), "TANDEM_DRAFT_ADDR or TANDEM_DRAFT_MODEL"),
    (dict(draft_model="d", engine="trtllm"), "TANDEM_DRAFT_MODEL"),
])
def test_contradictory_draft_settings_are_refused_by_name(overrides, names):
    with pytest.raises(ConfigError, match=names):
        _config(**overrides).validate()


def test_a_missing_draft_model_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError, match="TANDEM_DRAFT_MODEL"):
        build_draft_engine(_config(draft_model=str(tmp_path / "nowhere")))


def test_the_in_process_draft_proposes_and_releases_through_the_delta_protocol(ckpt):
    engine = build_draft_engine(_config(model=str(ckpt), draft_model=str(ckpt), draft_kv_cache_memory=1 << 20))
    telemetry = setup_telemetry(TelemetryConfig(service_name="t"), set_global=False, configure_logs=False)
    proposer = DraftProposer("", local=InProcessDraft(engine), vocab_size=engine.vocab_size, timeout_s=1.0,
                             retry_s=1.0, telemetry=telemetry)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    tokens = [1, *range(20, 40)]
    first = proposer.propose([ProposalRequest("r", tokens, 3, greedy)])["r"].token_ids
    assert len(first) == 3 and engine.stats().num_sequences == 1
    # the next call carries only the accepted tokens (the draft is its own target: all of them)
    again = proposer.propose([ProposalRequest("r", tokens + first, 2, greedy)])["r"].token_ids
    assert len(again) == 2 and proposer.num_failures == 0
    proposer.release("r")
    s = engine.stats()
    assert s.num_sequences == 0 and s.num_free_blocks == s.num_total_blocks
    proposer.close()


def test_a_failing_draft_call_ends_its_span_as_an_error_and_decoding_goes_on(ckpt):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    class BrokenDraft(InProcessDraft):
        def Propose(self, request, timeout=None, metadata=None):  # noqa: N802
            raise RuntimeError("draft exploded")

    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(TelemetryConfig(service_name="t"), set_global=False, configure_logs=False,
                                span_processors=[SimpleSpanProcessor(exporter)])
    proposer = DraftProposer("", local=BrokenDraft(None), vocab_size=64, timeout_s=1.0, retry_s=1.0,
                             telemetry=telemetry)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    assert proposer.propose([ProposalRequest("r", [1, 2, 3], 2, greedy)]) == {}
    assert proposer.num_failures == 1
    (span,) = exporter.get_finished_spans()
    assert span.name == "draft propose" and span.status.status_code is StatusCode.ERROR
    assert "draft exploded" in span.status.description
