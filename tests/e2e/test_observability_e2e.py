"""Observability across real processes: one trace per request, Prometheus metrics, JSON logs.

Scheduler, prefill, decode and draft run as `python -m services.<name>`, disaggregated (the
prompt's KV moves prefill -> decode over gRPC chunks or torch.distributed), speculating with
the draft service, every one exporting spans over OTLP/gRPC to a real TraceService receiver
(`tests/helpers/otlp.py`, Jaeger's collector port in production). Spans are checked after the
services stopped: what they still buffered must have been flushed on SIGTERM.

Requests: A with the client's own `traceparent`, then A's prompt again (prefix cache hit on
the prefill worker), then B and C at once (they share draft calls).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import urllib.request

import grpc
import pytest

from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from tests.helpers.otlp import OtlpReceiver

from .procs import Service, free_port

pytestmark = pytest.mark.slow

PROMPT_A = [1, *range(20, 60)]  # 41 tokens: 2 full blocks of 16 can be cached
PROMPT_B = [1, *range(100, 130)]
PROMPT_C = [1, *range(200, 225)]
MAX_TOKENS = {"obs-a": 12, "obs-a2": 8, "obs-b": 40, "obs-c": 40}
GPU_HOUR_USD = 2.5
BLOCK_SIZE = 16
# tiny checkpoint: 2 layers x (K, V) x 2 KV heads x head_dim 16, float32
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4


class Stack:
    """The four services, pointed at one OTLP receiver, each with its own /metrics port."""

    def __init__(self, tiny_model, transport: str, receiver: OtlpReceiver, logs):
        self.transport = transport
        self.ports = {name: free_port() for name in ("scheduler", "prefill", "decode", "draft")}
        self.metrics_ports = {name: free_port() for name in self.ports}
        addr = {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
        common = {
            "TANDEM_MODEL": str(tiny_model),
            "TANDEM_GRACE_PERIOD_S": "1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "TANDEM_LOG_JSON": "1",
            "TANDEM_LOG_LEVEL": "debug",
            "TANDEM_GPU_HOUR_USD": str(GPU_HOUR_USD),
            "TANDEM_NUM_GPUS": "1",
        }
        worker = {
            **common,
            "TANDEM_NUM_BLOCKS": "64",
            "TANDEM_KV_TRANSPORT": transport,
            "TANDEM_KV_CHUNK_BYTES": "4096",  # several chunks per prompt
        }
        env = {
            "draft": {
                **worker,
                "TANDEM_PORT": str(self.ports["draft"]),
            },  # the target itself: a perfect draft
            "prefill": {**worker, "TANDEM_PORT": str(self.ports["prefill"])},
            "decode": {
                **worker,
                "TANDEM_PORT": str(self.ports["decode"]),
                "TANDEM_DRAFT_ADDR": addr["draft"],
                "TANDEM_DRAFT_TIMEOUT_S": "10",  # generous: these machines are busy
                "TANDEM_SPEC_ADAPTIVE": "0",  # always k, so every request shows draft spans
            },
            "scheduler": {
                **common,
                "TANDEM_NUM_GPUS": "0",
                "TANDEM_PORT": str(self.ports["scheduler"]),
                "TANDEM_DECODE_ADDRS": addr["decode"],
                "TANDEM_PREFILL_ADDRS": addr["prefill"],
                "TANDEM_HEALTH_INTERVAL_S": "0.2",
            },
        }
        self.services: dict[str, Service] = {}
        for name in ("draft", "prefill", "decode", "scheduler"):
            e = {**env[name], "TANDEM_METRICS_PORT": str(self.metrics_ports[name])}
            self.services[name] = Service(name, e, logs)
        self.address = addr

    def scrape(self, name: str) -> dict[str, float]:
        """`name{labels}` -> value, from the service's /metrics over HTTP."""
        url = f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def stop(self) -> set[str]:
        """SIGTERM to every service; returns those that stopped gracefully (logged "stopped",
        which comes after their telemetry shutdown flushed the spans). The processes are then
        killed: a worker spends seconds more in the interpreter's final garbage collection."""
        for s in reversed(list(self.services.values())):
            s.terminate()
        deadline = time.monotonic() + 30
        stopped: set[str] = set()
        while len(stopped) < len(self.services) and time.monotonic() < deadline:
            for name in self.services:
                if any(line.get("event") == "stopped" for line in self.log_lines(name)):
                    stopped.add(name)
            time.sleep(0.1)
        for s in self.services.values():
            s.kill()
        return stopped

    def log_lines(self, name: str) -> list[dict]:
        """The service's JSON log lines (its stderr; anything else on it is skipped)."""
        lines = []
        for raw in self.services[name].log_path.read_text().splitlines():
            if raw.startswith("{"):
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError:
                    pass
        return lines


def generate(address, request_id, prompt, metadata=()) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParameters(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=MAX_TOKENS[request_id], ignore_eos=True),
    )
    with grpc.insecure_channel(address) as channel:
        return list(generate_pb2_grpc.TandemStub(channel).Generate(request, metadata=metadata, timeout=120))


def wait_workers_healthy(address: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        while True:
            info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=5)
            if {w.role for w in info.workers if w.healthy} >= {"prefill", "decode"}:
                return
            assert time.monotonic() < deadline, info
            time.sleep(0.1)


@pytest.fixture(scope="module", params=["grpc", "collective"])
def served(request, tiny_model, tmp_path_factory):
    """Start the stack, serve the four requests, scrape, stop; yields what the tests check."""
    transport = request.param
    trace_id, parent_span_id = secrets.token_hex(16), secrets.token_hex(8)
    with OtlpReceiver() as receiver:
        stack = Stack(tiny_model, transport, receiver, tmp_path_factory.mktemp(f"obs-{transport}"))
        try:
            for s in stack.services.values():
                s.wait_serving()
            wait_workers_healthy(stack.address["scheduler"])
            sched = stack.address["scheduler"]
            usage = {}
            traceparent = (("traceparent", f"00-{trace_id}-{parent_span_id}-01"),)
            usage["obs-a"] = generate(sched, "obs-a", PROMPT_A, traceparent)[-1].usage
            usage["obs-a2"] = generate(sched, "obs-a2", PROMPT_A)[-1].usage
            results = {}
            threads = [
                threading.Thread(
                    target=lambda rid=rid, p=p: results.__setitem__(rid, generate(sched, rid, p))
                )
                for rid, p in (("obs-b", PROMPT_B), ("obs-c", PROMPT_C))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert set(results) == {"obs-b", "obs-c"}, "a concurrent request failed (see its service log)"
            usage.update({rid: responses[-1].usage for rid, responses in results.items()})
            time.sleep(0.7)  # the workers sample their engine gauges every 0.5 s
            metrics = {name: stack.scrape(name) for name in stack.services}
        except BaseException:
            for s in stack.services.values():
                print(f"--- {s.name} ---\n{s.log()}")
            stack.stop()
            raise
        stopped = stack.stop()
        assert stopped == set(stack.services), stopped
        # read once every service logged "stopped": what they still buffered was flushed on SIGTERM
        spans = receiver.spans
    yield {
        "transport": transport,
        "trace_id": trace_id,
        "parent_span_id": parent_span_id,
        "stack": stack,
        "usage": usage,
        "metrics": metrics,
        "spans": spans,
    }


def by_request(spans, request_id):
    return [s for s in spans if s["attributes"].get("tandem.request_id") == request_id]


def one(spans, name, service):
    found = [s for s in spans if s["name"] == name and s["service"] == service]
    assert len(found) == 1, (name, service, [(s["name"], s["service"]) for s in spans])
    return found[0]


def test_one_request_is_one_trace_continuing_the_clients(served):
    trace_id, transport = served["trace_id"], served["transport"]
    spans = [s for s in served["spans"] if s["trace_id"] == trace_id]
    # every span of request A, on every service, is in the client's trace
    assert {s["trace_id"] for s in by_request(served["spans"], "obs-a")} == {trace_id}
    assert {s["service"] for s in spans} == {
        "tandem-scheduler",
        "tandem-decode",
        "tandem-prefill",
        "tandem-draft",
    }
    ids = {s["span_id"]: s for s in spans}

    def parent(s):
        return ids.get(s["parent_span_id"])

    # scheduler: the client's span is the parent of the server span; generate -> route, Decode call
    server = one(spans, "tandem.v1.Tandem/Generate", "tandem-scheduler")
    assert server["parent_span_id"] == served["parent_span_id"] and server["kind"] == "SERVER"
    generate_span = one(spans, "generate", "tandem-scheduler")
    assert parent(generate_span) is server
    route = one(spans, "route", "tandem-scheduler")
    assert parent(route) is generate_span
    decode_client = one(spans, "tandem.v1.Decode/Generate", "tandem-scheduler")
    assert parent(decode_client) is generate_span and decode_client["kind"] == "CLIENT"
    # decode: its server span under the scheduler's call; KV transfer (which calls the prefill
    # worker), decoding, and the draft calls under it
    decode_server = one(spans, "tandem.v1.Decode/Generate", "tandem-decode")
    assert parent(decode_server) is decode_client
    kv_in = one(spans, "kv_transfer", "tandem-decode")
    decode = one(spans, "decode", "tandem-decode")
    assert parent(kv_in) is decode_server and parent(decode) is decode_server
    prefill_client = one(spans, "tandem.v1.Prefill/Prefill", "tandem-decode")
    assert parent(prefill_client) is kv_in
    # prefill: server span under the decode worker's call; prefill, then sending the KV
    prefill_server = one(spans, "tandem.v1.Prefill/Prefill", "tandem-prefill")
    assert parent(prefill_server) is prefill_client
    prefill = one(spans, "prefill", "tandem-prefill")
    kv_out = one(spans, "kv_transfer", "tandem-prefill")
    assert parent(prefill) is prefill_server and parent(kv_out) is prefill_server
    # draft: each call's client span under the decode server span, the draft's server span under it
    proposes = [s for s in spans if s["name"] == "draft propose"]
    draft_servers = [s for s in spans if s["name"] in ("tandem.v1.Draft/Propose", "tandem.v1.Draft/ProposeAhead")]
    assert proposes and len(draft_servers) == len(proposes)
    assert all(parent(p) is decode_server and p["service"] == "tandem-decode" for p in proposes)
    assert all(parent(d)["name"] == "draft propose" and d["service"] == "tandem-draft" for d in draft_servers)

    # attributes
    usage = served["usage"]["obs-a"]
    a = generate_span["attributes"]
    assert a["tandem.request_id"] == "obs-a"
    assert (a["tandem.prompt_tokens"], a["tandem.completion_tokens"]) == (len(PROMPT_A), MAX_TOKENS["obs-a"])
    assert a["tandem.finish_reason"] == "FINISH_REASON_LENGTH"
    assert (a["tandem.spec_proposed"], a["tandem.spec_accepted"]) == (
        usage.spec_proposed_tokens,
        usage.spec_accepted_tokens,
    )
    assert usage.spec_accepted_tokens > 0  # the draft is the target model itself
    r = route["attributes"]
    assert r["tandem.decode_worker"] == served["stack"].address["decode"]
    assert r["tandem.prefill_worker"] == served["stack"].address["prefill"]
    assert r["tandem.disaggregated"] is True
    kv_bytes = KV_BYTES_PER_TOKEN * len(PROMPT_A)
    k = kv_in["attributes"]
    assert (k["tandem.kv_transport"], k["tandem.kv_bytes"]) == (transport, kv_bytes)
    assert k["tandem.kv_blocks"] == -(-len(PROMPT_A) // BLOCK_SIZE) and k["tandem.kv_seconds"] > 0
    assert k["tandem.prefill_seconds"] >= k["tandem.kv_seconds"]
    assert kv_out["attributes"]["tandem.kv_bytes"] == kv_bytes
    assert kv_out["attributes"]["tandem.kv_transport"] == transport
    p = prefill["attributes"]
    assert (p["tandem.prompt_tokens"], p["tandem.cached_tokens"]) == (len(PROMPT_A), 0)
    assert p["tandem.queue_seconds"] >= 0
    d = decode["attributes"]
    assert d["tandem.completion_tokens"] == MAX_TOKENS["obs-a"]
    assert (d["tandem.spec_proposed"], d["tandem.spec_accepted"]) == (
        usage.spec_proposed_tokens,
        usage.spec_accepted_tokens,
    )
    assert sum(s["attributes"]["tandem.spec_proposed"] for s in draft_servers) >= usage.spec_proposed_tokens
    assert all(s["attributes"]["tandem.request_ids"] == "obs-a" for s in proposes)
    for s in (
        server,
        decode_client,
        decode_server,
        prefill_client,
        prefill_server,
        *proposes,
        *draft_servers,
    ):
        assert s["attributes"]["rpc.grpc.status_code"] == 0, (s["name"], s["service"], s["kind"])
    assert all(s["status"]["code"] != "ERROR" for s in spans)


def test_a_shared_draft_call_is_in_one_requests_trace_and_links_the_others(served):
    spans = served["spans"]
    decode_servers = {
        s["attributes"]["tandem.request_id"]: s
        for s in spans
        if s["name"] == "tandem.v1.Decode/Generate" and s["service"] == "tandem-decode"
    }
    shared = [
        s for s in spans if s["name"] == "draft propose" and s["attributes"]["tandem.request_ids"].count(",")
    ]
    assert shared, "B and C never speculated in the same step"
    for s in shared:
        rids = s["attributes"]["tandem.request_ids"].split(",")
        targets = [decode_servers[rid] for rid in rids]
        # one link per request, to that request's decode span (in that request's trace)
        assert [(x["trace_id"], x["span_id"], x["attributes"]["tandem.request_id"]) for x in s["links"]] == [
            (t["trace_id"], t["span_id"], rid) for t, rid in zip(targets, rids, strict=True)
        ]
        # a child of the first (oldest) request's span
        assert (s["trace_id"], s["parent_span_id"]) == (targets[0]["trace_id"], targets[0]["span_id"])
    # the two requests are two traces
    assert decode_servers["obs-b"]["trace_id"] != decode_servers["obs-c"]["trace_id"]


def test_metrics_agree_with_what_was_served(served):
    m, usage, transport = served["metrics"], served["usage"], served["transport"]
    prompt = sum(u.prompt_tokens for u in usage.values())
    completion = sum(u.completion_tokens for u in usage.values())
    proposed = sum(u.spec_proposed_tokens for u in usage.values())
    accepted = sum(u.spec_accepted_tokens for u in usage.values())
    assert completion == sum(MAX_TOKENS.values())
    n = len(usage)

    sched = m["scheduler"]
    assert sched["tandem_generation_tokens_total"] == completion
    assert sched["tandem_prompt_tokens_total"] == prompt
    assert sched["tandem_time_to_first_token_seconds_count"] == n
    assert sched["tandem_e2e_request_latency_seconds_count"] == n
    assert sched["tandem_inter_token_latency_seconds_count"] == completion - n
    assert sched["tandem_request_queue_time_seconds_count"] == n
    assert sched["tandem_queue_depth"] == 0 and sched["tandem_running_sequences"] == 0
    assert sched["tandem_gpus"] == 0 and sched["tandem_gpu_cost_usd"] == 0

    decode = m["decode"]
    assert decode["tandem_generation_tokens_total"] == completion
    assert decode["tandem_spec_proposed_tokens_total"] == proposed
    assert decode["tandem_spec_accepted_tokens_total"] == accepted > 0
    assert decode[f'tandem_kv_transfer_bytes_total{{transport="{transport}"}}'] == KV_BYTES_PER_TOKEN * prompt
    assert decode[f'tandem_kv_transfer_seconds_total{{transport="{transport}"}}'] > 0
    assert decode["tandem_kv_blocks_total"] == 64 and decode["tandem_kv_blocks_used"] == 0
    assert decode["tandem_running_sequences"] == 0 and decode["tandem_preemptions_total"] == 0
    # cost: uptime * GPUs * price per GPU-hour, per million generated tokens
    assert decode["tandem_gpu_hour_price_usd"] == GPU_HOUR_USD and decode["tandem_gpus"] == 1
    cost = decode["tandem_gpu_cost_usd"] / completion * 1e6
    assert decode["tandem_estimated_cost_usd_per_million_generated_tokens"] == pytest.approx(cost, rel=0.01)

    prefill = m["prefill"]
    assert prefill["tandem_prompt_tokens_total"] == prompt
    assert prefill["tandem_request_queue_time_seconds_count"] == n
    # A's prompt again: its 2 full blocks came from the prefill worker's prefix cache
    cached = sum(u.cached_tokens for u in usage.values())
    assert usage["obs-a2"].cached_tokens == 2 * BLOCK_SIZE == cached
    assert prefill["tandem_prefix_cache_queried_tokens_total"] == prompt
    assert prefill["tandem_prefix_cache_hit_tokens_total"] == cached
    assert prefill["tandem_prefix_cache_hit_ratio"] == pytest.approx(cached / prompt)

    draft = m["draft"]
    assert draft["tandem_kv_blocks_total"] == 64
    for name, samples in m.items():
        assert samples[f'tandem_service_info{{service="tandem-{name}"}}'] == 1


def test_logs_of_a_request_carry_its_trace_id(served):
    trace_id = served["trace_id"]
    span_ids = {s["span_id"] for s in served["spans"] if s["trace_id"] == trace_id}
    stack = served["stack"]
    for name in ("scheduler", "decode", "prefill"):
        lines = stack.log_lines(name)
        assert lines, f"{name}: no JSON log lines"
        for line in lines:
            assert {"timestamp", "level", "service", "event"} <= set(line), line
            assert line["service"] == f"tandem-{name}"
        mine = [line for line in lines if line.get("request_id") == "obs-a"]
        assert mine, f"{name}: no log line of request obs-a"
        for line in mine:
            assert line["trace_id"] == trace_id, line
            assert re.fullmatch(r"[0-9a-f]{16}", line["span_id"]) and line["span_id"] in span_ids, line
    finished = [line for line in stack.log_lines("scheduler") if line["event"] == "request finished"]
    assert {line["request_id"] for line in finished} == set(MAX_TOKENS)
    a = next(line for line in finished if line["request_id"] == "obs-a")
    assert (a["prompt_tokens"], a["completion_tokens"], a["finish_reason"]) == (
        len(PROMPT_A),
        MAX_TOKENS["obs-a"],
        "FINISH_REASON_LENGTH",
    )
