"""The draft's stream transport (services/common/draft_stream.py) against a real draft service in
this process: the same answers as gRPC, the same status codes for bad calls, a connection that
survives them, deadlines, a broken connection, and when the stream is not served at all.
Through the whole stack (decode worker, restarts, traces): tests/integration/test_spec.py."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import grpc
import pytest

from services.common.draft_stream import HEADER, StreamDraftStub, StreamError, encode
from services.draft.app import DraftApp
from shared.config import DraftConfig, WorkerConfig, from_env
from shared.pb.tandem.v1 import draft_pb2, draft_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-draft"))


def _draft(model, **overrides) -> DraftApp:
    config = from_env(
        DraftConfig,
        env={},
        overrides=dict(model=str(model), host="127.0.0.1", port=0, num_blocks=64, block_size=4, grace_period_s=0.1,
                       **overrides),
    )
    return DraftApp(config)


def _ask(sid: str, tokens: list[int], client: str = "c", kept: int = 0) -> draft_pb2.ProposeRequest:
    return draft_pb2.ProposeRequest(
        client_id=client,
        sequences=[draft_pb2.DraftSequence(sequence_id=sid, num_kept_tokens=kept, token_ids=tokens, num_proposals=4)],
    )


async def _stream_port(draft: DraftApp) -> int:
    async with grpc.aio.insecure_channel(draft.address) as channel:
        info = await worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest())
    return info.stream_port


async def test_the_stream_answers_as_grpc_does_and_survives_bad_calls(draft_model):
    draft = _draft(draft_model)
    await draft.start()
    try:
        port = await _stream_port(draft)
        assert port > 0 and port != draft.server.port
        assert draft.stream._server.sockets[0].getsockname()[0] == "127.0.0.1"  # TANDEM_HOST only
        stub = StreamDraftStub("127.0.0.1", port)
        prompt = [1, *range(40, 60)]
        over_stream = await asyncio.to_thread(stub.Propose, _ask("s", prompt, client="a"), 10.0)
        async with grpc.aio.insecure_channel(draft.address) as channel:
            over_grpc = await draft_pb2_grpc.DraftStub(channel).Propose(_ask("s", prompt, client="b"))
        assert list(over_stream.proposals[0].token_ids) == list(over_grpc.proposals[0].token_ids)
        assert len(over_stream.proposals[0].token_ids) == 4 and over_stream.vocab_size == draft.engine.vocab_size

        # a sequence with no tokens: INVALID_ARGUMENT naming the field, as over gRPC, and the connection stays
        with pytest.raises(StreamError) as e:
            await asyncio.to_thread(stub.Propose, _ask("bad", []), 10.0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("token_ids")
        # the delta protocol goes on over the same connection: keep the prompt, add two tokens
        kept = len(prompt)
        again = await asyncio.to_thread(stub.Propose, _ask("s", [5, 6], client="a", kept=kept), 10.0)
        assert len(again.proposals[0].token_ids) == 4 and not again.proposals[0].unknown_sequence
        # a future answered after the call before it, both read in order
        first = stub.Propose.future(_ask("t1", prompt), timeout=10.0)
        second = stub.Propose.future(_ask("t2", prompt), timeout=10.0)
        assert len((await asyncio.to_thread(second.result)).proposals) == 1
        assert len((await asyncio.to_thread(first.result)).proposals) == 1
        released = await asyncio.to_thread(
            stub.Release, draft_pb2.ReleaseRequest(client_id="a", sequence_ids=["s"]), 10.0
        )
        assert released.num_released == 1
        stub.close()
    finally:
        await draft.stop(0.1)


def _raw_call(sock: socket.socket, frame: draft_pb2.StreamFrame) -> draft_pb2.StreamFrame:
    sock.sendall(encode(frame))
    (size,) = HEADER.unpack(_read(sock, HEADER.size))
    return draft_pb2.StreamFrame.FromString(_read(sock, size))


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


async def test_unknown_methods_unreadable_bodies_and_oversized_frames(draft_model):
    draft = _draft(draft_model)
    await draft.start()
    try:
        port = await _stream_port(draft)

        def calls():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                unknown = _raw_call(sock, draft_pb2.StreamFrame(call_id=7, method="ProposeAhead"))
                garbage = _raw_call(sock, draft_pb2.StreamFrame(call_id=8, method="Propose", body=b"\xff\xff\xff"))
                good = _raw_call(sock, draft_pb2.StreamFrame(call_id=9, method="Propose",
                                                             body=_ask("s", [1, 2, 3]).SerializeToString()))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(struct.pack("<I", 1 << 30))  # a 1 GiB frame: the draft closes the connection
                closed = sock.recv(1) == b""
            return unknown, garbage, good, closed

        unknown, garbage, good, closed = await asyncio.to_thread(calls)
        assert (unknown.call_id, unknown.status_code) == (7, grpc.StatusCode.UNIMPLEMENTED.value[0])
        assert (garbage.call_id, garbage.status_code) == (8, grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert good.call_id == 9 and good.status_code == 0
        assert len(draft_pb2.ProposeResponse.FromString(good.body).proposals[0].token_ids) == 4
        assert closed
        # the draft serves on: a new connection gets its answers
        stub = StreamDraftStub("127.0.0.1", port)
        assert len((await asyncio.to_thread(stub.Propose, _ask("u", [1, 2]), 10.0)).proposals) == 1
        stub.close()
    finally:
        await draft.stop(0.1)


async def test_a_late_answer_misses_its_deadline_and_is_dropped(draft_model):
    draft = _draft(draft_model)
    propose = draft.engine.propose
    slow = {"on": True}

    def maybe_slow(asks):
        if slow["on"]:
            time.sleep(0.3)
        return propose(asks)

    draft.engine.propose = maybe_slow
    await draft.start()
    try:
        stub = StreamDraftStub("127.0.0.1", await _stream_port(draft))
        with pytest.raises(StreamError) as e:
            await asyncio.to_thread(stub.Propose, _ask("late", [1, 2, 3]), 0.05)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        slow["on"] = False
        # the next call reads past the late answer to its own
        answer = await asyncio.to_thread(stub.Propose, _ask("next", [1, 2, 3, 4, 5]), 10.0)
        assert len(answer.proposals) == 1 and answer.proposals[0].sequence_id == "next"
        stub.close()
    finally:
        await draft.stop(0.1)


async def test_a_broken_connection_fails_the_call_and_the_next_one_reconnects(draft_model):
    draft = _draft(draft_model)
    await draft.start()
    port = await _stream_port(draft)
    stub = StreamDraftStub("127.0.0.1", port)
    try:
        assert len((await asyncio.to_thread(stub.Propose, _ask("a", [1, 2]), 10.0)).proposals) == 1
        # closed from another thread (the decode worker's shutdown) while a call waits
        propose = draft.engine.propose
        draft.engine.propose = lambda asks: (time.sleep(0.5), propose(asks))[1]
        future = stub.Propose.future(_ask("b", [1, 2]), timeout=10.0)
        threading.Timer(0.1, stub.close).start()
        with pytest.raises(StreamError) as e:
            await asyncio.to_thread(future.result)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        draft.engine.propose = propose
        assert len((await asyncio.to_thread(stub.Propose, _ask("c", [1, 2]), 10.0)).proposals) == 1
    finally:
        stub.close()
        await draft.stop(0.1)
    # the draft is gone: UNAVAILABLE at once, naming the address
    with pytest.raises(StreamError) as e:
        await asyncio.to_thread(stub.Propose, _ask("d", [1, 2]), 1.0)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and f"127.0.0.1:{port}" in e.value.details()


async def test_no_stream_when_turned_off(draft_model):
    draft = _draft(draft_model, stream=False)
    await draft.start()
    try:
        assert draft.stream is None and await _stream_port(draft) == 0
    finally:
        await draft.stop(0.1)


async def test_no_stream_with_tls(draft_model, tmp_path):
    from tools.certs import Authority

    Authority().write(tmp_path, ["draft"])
    draft = _draft(draft_model, tls_cert=str(tmp_path / "draft.pem"), tls_key=str(tmp_path / "draft.key"),
                   tls_ca=str(tmp_path / "ca.pem"))
    assert draft.tls.enabled and draft.stream is None  # the stream has no TLS: decode workers use gRPC's


async def test_the_decode_workers_proposer_takes_the_stream_or_falls_back_to_grpc(draft_model):
    """DraftProposer asks GetInfo for the stream; a stream port it cannot reach (one the network
    does not route) leaves it on gRPC, with the same proposals."""
    from services.common.telemetry import quiet_telemetry
    from services.decode.draft_client import DraftProposer
    from shared.engine.spec import ProposalRequest
    from shared.params import SamplingParams
    from tools.bench.topology import free_ports

    draft = _draft(draft_model)
    await draft.start()
    telemetry = quiet_telemetry("t")
    greedy = SamplingParams(temperature=0.0, max_tokens=64)
    prompt = [1, *range(40, 60)]
    try:
        drafts = {}
        for case in ("stream", "unreachable", "grpc"):
            if case == "unreachable":
                draft.worker_servicer.stream_port = free_ports(1)[0]  # nobody listens there
            proposer = DraftProposer(draft.address, vocab_size=draft.engine.vocab_size, timeout_s=10.0, retry_s=1.0,
                                     telemetry=telemetry, transport="grpc" if case == "grpc" else "stream")
            got = await asyncio.to_thread(proposer.propose, [ProposalRequest(case, prompt, 4, greedy)])
            drafts[case] = got[case].token_ids
            assert proposer.transport == ("stream" if case == "stream" else "grpc") and proposer.num_failures == 0
            await asyncio.to_thread(proposer.release, case)
            proposer.close()
        assert drafts["stream"] == drafts["unreachable"] == drafts["grpc"] and len(drafts["grpc"]) == 4
        assert draft.engine.stats().num_sequences == 0  # every release arrived, on either transport
    finally:
        await draft.stop(0.1)


def test_the_stream_port_settings_are_checked():
    from shared.config import ConfigError

    env = {"TANDEM_MODEL": "/m", "TANDEM_PORT": "6000"}
    assert from_env(DraftConfig, env={**env}).stream_port == 0  # a free one by default
    with pytest.raises(ConfigError, match="TANDEM_DRAFT_STREAM_PORT: 6000 is the gRPC port"):
        from_env(DraftConfig, env={**env, "TANDEM_DRAFT_STREAM_PORT": "6000"})
    with pytest.raises(ConfigError, match="TANDEM_DRAFT_STREAM_PORT"):
        from_env(DraftConfig, env={**env, "TANDEM_DRAFT_STREAM_PORT": "70000"})
    with pytest.raises(ConfigError, match="TANDEM_DRAFT_TRANSPORT"):
        from_env(WorkerConfig, env={"TANDEM_MODEL": "/m", "TANDEM_DRAFT_TRANSPORT": "udp"})
