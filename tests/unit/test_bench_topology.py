"""What the benchmark starts for each configuration: processes, loopback ports, environment."""

from __future__ import annotations

from tools.bench.topology import CONFIGURATIONS, EngineSettings, Services, free_ports, unavailable_reason


def plan(name: str, tmp_path, **engine) -> tuple[Services, dict]:
    svc = Services(str(tmp_path / "target"), CONFIGURATIONS[name], EngineSettings(**engine), threads=3)
    return svc, svc.plan()


def test_aggregated_has_no_prefill_worker(tmp_path):
    svc, p = plan("agg", tmp_path, max_num_seqs=8, num_blocks=99)
    assert list(p) == ["decode", "scheduler"]
    module, decode = p["decode"]
    assert module == "services.decode"
    assert decode["TANDEM_PREFIX_CACHING"] == "1" and decode["TANDEM_TORCH_THREADS"] == "3"
    assert decode["TANDEM_MAX_NUM_SEQS"] == "8" and decode["TANDEM_NUM_BLOCKS"] == "99"
    assert decode["TANDEM_SPEC_PROPOSER"] == "none"
    assert p["scheduler"][1]["TANDEM_PREFILL_ADDRS"] == ""
    assert p["scheduler"][1]["TANDEM_DECODE_ADDRS"] == svc.addrs["decode"]


def test_disaggregated_routes_through_one_prefill_worker(tmp_path):
    svc, p = plan("disagg", tmp_path)
    assert set(p) == {"decode", "prefill", "scheduler"}
    assert p["scheduler"][1]["TANDEM_PREFILL_ADDRS"] == svc.addrs["prefill"]


def test_prefix_caching_off(tmp_path):
    _, p = plan("disagg-nocache", tmp_path)
    assert p["decode"][1]["TANDEM_PREFIX_CACHING"] == "0" and p["prefill"][1]["TANDEM_PREFIX_CACHING"] == "0"


def test_speculation_starts_the_draft_service_on_the_draft_model(tmp_path):
    svc, p = plan("agg-spec", tmp_path)
    assert p["draft"][0] == "services.draft"
    assert p["draft"][1]["TANDEM_MODEL"] == str((tmp_path / "draft").resolve())
    assert p["decode"][1]["TANDEM_DRAFT_ADDR"] == svc.addrs["draft"]
    assert p["decode"][1]["TANDEM_SPEC_PROPOSER"] == "draft"
    _, ngram = plan("agg-ngram", tmp_path)
    assert "draft" not in ngram and ngram["decode"][1]["TANDEM_SPEC_PROPOSER"] == "ngram"


def test_the_in_worker_draft_runs_no_draft_service(tmp_path):
    _, p = plan("agg-spec-local", tmp_path)
    decode = p["decode"][1]
    assert "draft" not in p and "TANDEM_DRAFT_ADDR" not in decode
    assert decode["TANDEM_SPEC_PROPOSER"] == "draft"
    assert decode["TANDEM_DRAFT_MODEL"] == str((tmp_path / "draft").resolve())


def test_every_port_is_distinct_loopback_with_metrics(tmp_path):
    svc, p = plan("disagg", tmp_path)
    ports = [env["TANDEM_PORT"] for _, env in p.values()] + [
        env["TANDEM_METRICS_PORT"] for _, env in p.values()
    ]
    assert len(set(ports)) == len(ports) == 6
    assert all(env["TANDEM_HOST"] == "127.0.0.1" for _, env in p.values())
    assert all(a.startswith("127.0.0.1:") for a in svc.addrs.values())
    assert svc.metrics_urls["decode"] == f"http://127.0.0.1:{p['decode'][1]['TANDEM_METRICS_PORT']}/metrics"
    assert len(set(free_ports(5))) == 5


def test_speculation_without_a_draft_model_is_skipped_with_a_reason(tmp_path):
    assert unavailable_reason(CONFIGURATIONS["agg"], str(tmp_path / "target")) is None
    reason = unavailable_reason(CONFIGURATIONS["agg-spec"], str(tmp_path / "target"))
    assert reason is not None and reason.startswith("speculation skipped")
