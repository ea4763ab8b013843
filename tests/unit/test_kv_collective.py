"""KV over torch.distributed (gloo) between real processes, through shared.kv.collective.

The sender runs in a second Python process: this file run as a script, driven by JSON
lines on stdin, answering with TransferMeta dicts on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from shared.engine.model import kv_quant
from shared.kv import (
    CollectiveKvReceiver,
    CollectiveKvSender,
    KvChecksumError,
    KvTransferError,
    KvTransferTimeout,
    TransferMeta,
)

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 3.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def payload(shape, dtype: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype in kv_quant.FORMATS:  # an 8-bit cache's packed rows: last dim head_dim + head_dim / 32
        head_dim = shape[-1] * kv_quant.GROUP // (kv_quant.GROUP + 1)
        return kv_quant.quantize(torch.randn(*shape[:-1], head_dim, generator=g) * 4, dtype)
    return torch.randn(shape, generator=g).to(DTYPES[dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


class SenderProcess:
    """A prefill-side process holding CollectiveKvSenders."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # c10d prints socket warnings when a peer goes away
            env=env,
            text=True,
        )

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"sender process died (rc={self.proc.poll()})"
        reply = json.loads(line)
        assert "error" not in reply, reply["error"]
        return reply

    def send(self, address, pair, specs, threads=1, device="cpu") -> list[TransferMeta]:
        reply = self.call(op="send", address=address, pair=pair, specs=specs, threads=threads, device=device)
        return [TransferMeta.from_dict(m) for m in reply["metas"]]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def sender():
    proc = SenderProcess()
    yield proc
    proc.close()


@pytest.fixture
def receiver():
    r = CollectiveKvReceiver("127.0.0.1", 0, timeout_s=TIMEOUT_S)
    yield r
    r.close()


def test_transfers_from_another_process_are_bit_identical(sender, receiver):
    specs = [
        {"shape": [4, 2, 33, 3, 16], "dtype": "float32", "seed": 1},
        {"shape": [3, 2, 17, 1, 7], "dtype": "bfloat16", "seed": 2},
        {"shape": [1, 2, 1, 5, 3], "dtype": "float16", "seed": 3},
        {"shape": [2, 2, 0, 2, 4], "dtype": "float32", "seed": 4},  # an empty prompt tail
        {"shape": [8, 2, 512, 2, 64], "dtype": "bfloat16", "seed": 5},  # 2 MiB, more than one socket buffer
    ]
    metas = sender.send(receiver.address, "p0->d0", specs)
    assert len({m.transfer_id for m in metas}) == len(specs)
    for spec, meta in zip(specs, metas, strict=True):
        got = receiver.recv(meta)
        assert same_bits(got, payload(spec["shape"], spec["dtype"], spec["seed"]))
    # the group is cached: the next transfers reuse the same epoch
    more = sender.send(receiver.address, "p0->d0", specs[:1])
    assert more[0].epoch == metas[0].epoch and more[0].seq == len(specs)
    assert same_bits(receiver.recv(more[0]), payload(**specs[0]))
    assert receiver.num_unclaimed() == 0


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_8bit_kv_with_its_scales_arrives_bit_identical(sender, receiver, fmt):
    """An 8-bit cache's payload (elements and E8M0 scales in one packed row) crosses as its bytes."""
    spec = {"shape": [3, 2, 37, 2, 66], "dtype": fmt, "seed": 11}  # head_dim 64 -> 66 bytes a row
    (meta,) = sender.send(receiver.address, f"p-{fmt}->d0", [spec])
    assert meta.dtype == fmt and meta.nbytes == 3 * 2 * 37 * 2 * 66
    got = receiver.recv(meta)
    assert got.dtype == kv_quant.FORMATS[fmt]
    assert same_bits(got, payload(**spec))


def test_concurrent_transfers_from_two_threads_arrive_intact(sender, receiver):
    specs = [{"shape": [2, 2, 8 + i, 2, 8], "dtype": "float16", "seed": 100 + i} for i in range(12)]
    metas = sender.send(receiver.address, "p1->d0", specs, threads=2)
    by_seed = {}
    for spec, meta in zip(specs, metas, strict=True):
        by_seed[spec["seed"]] = (spec, meta)
    assert sorted(m.seq for m in metas) == list(range(len(specs)))
    # decode-side callers come in any order, from several threads
    results: dict[int, bool] = {}

    def claim(seeds):
        for seed in seeds:
            spec, meta = by_seed[seed]
            results[seed] = same_bits(receiver.recv(meta), payload(spec["shape"], spec["dtype"], seed))

    seeds = sorted(by_seed, reverse=True)
    workers = [threading.Thread(target=claim, args=(seeds[i::3],)) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)
    assert results == dict.fromkeys(by_seed, True)


def test_two_pairs_into_one_receiver_are_independent(sender, receiver):
    a = sender.send(receiver.address, "pa->d0", [{"shape": [1, 2, 4, 1, 4], "dtype": "float32", "seed": 7}])
    b = sender.send(receiver.address, "pb->d0", [{"shape": [1, 2, 4, 1, 4], "dtype": "float32", "seed": 8}])
    assert a[0].epoch != b[0].epoch
    assert same_bits(receiver.recv(b[0]), payload([1, 2, 4, 1, 4], "float32", 8))
    assert same_bits(receiver.recv(a[0]), payload([1, 2, 4, 1, 4], "float32", 7))
    assert receiver.pair_names() == ["pa->d0", "pb->d0"]


def test_sender_that_never_sends_times_out_and_receiver_serves_the_next_pair(sender, receiver):
    stalled = sender.call(op="stall", address=receiver.address, pair="stuck->d0")
    meta = TransferMeta(
        transfer_id=f"{stalled['epoch']}#0",
        pair_name="stuck->d0",
        epoch=stalled["epoch"],
        seq=0,
        shape=(1, 2, 4, 1, 4),
        dtype="float32",
        nbytes=128,
        checksum=0,
        checksum_kind="crc32",
    )
    t0 = time.monotonic()
    with pytest.raises(KvTransferTimeout):
        receiver.recv(meta, timeout_s=1.0)
    assert time.monotonic() - t0 < 2.5
    assert "stuck->d0" not in receiver.pair_names()  # its group was torn down
    spec = {"shape": [2, 2, 5, 2, 4], "dtype": "bfloat16", "seed": 9}
    (next_meta,) = sender.send(receiver.address, "p2->d0", [spec])
    assert same_bits(receiver.recv(next_meta), payload(**spec))


def test_dead_sender_process_fails_its_transfer_and_a_restarted_one_works(sender, receiver):
    spec = {"shape": [1, 2, 4, 1, 4], "dtype": "float32", "seed": 11}
    doomed = SenderProcess()
    try:
        (first,) = doomed.send(receiver.address, "p3->d0", [spec])
        assert same_bits(receiver.recv(first), payload(**spec))
        doomed.proc.kill()
        doomed.proc.wait()
        lost = TransferMeta(**{**first.to_dict(), "transfer_id": f"{first.epoch}#1", "seq": 1})
        t0 = time.monotonic()
        with pytest.raises(KvTransferError):
            receiver.recv(lost)
        assert time.monotonic() - t0 < TIMEOUT_S + 1.5
    finally:
        doomed.close()
    # another process takes over the pair name: a new epoch replaces the dead one
    (meta,) = sender.send(receiver.address, "p3->d0", [spec])
    assert meta.epoch != first.epoch
    assert same_bits(receiver.recv(meta), payload(**spec))


def test_sender_recovers_with_a_new_group_after_the_receiver_dropped_the_pair(receiver):
    # Both sides in this process (separate threads, separate groups): a receiver-side
    # timeout tears the pair down, the sender's next transfer fails, the one after works.
    sender = CollectiveKvSender(receiver.address, "local->d0", timeout_s=TIMEOUT_S)
    try:
        kv = payload([2, 2, 6, 2, 4], "float32", 12)
        meta = sender.send(kv)
        assert same_bits(receiver.recv(meta), kv)
        ghost = TransferMeta(**{**meta.to_dict(), "transfer_id": f"{meta.epoch}#99", "seq": 99})
        with pytest.raises(KvTransferTimeout):
            receiver.recv(ghost, timeout_s=0.3)
        with pytest.raises(KvTransferError):
            sender.send(kv)  # the old group is gone on the receiver side
        meta2 = sender.send(kv)
        assert meta2.epoch != meta.epoch
        assert same_bits(receiver.recv(meta2), kv)
    finally:
        sender.close()


def test_pooled_receive_buffers_never_overwrite_a_payload_still_held(receiver):
    sender = CollectiveKvSender(receiver.address, "pool->d0", timeout_s=TIMEOUT_S)
    try:
        a, b = payload([2, 2, 64, 2, 8], "float32", 14), payload([2, 2, 64, 2, 8], "float32", 15)
        held = receiver.recv(sender.send(a))
        for _ in range(3):  # same size: would reuse `held`'s buffer if it were idle
            assert same_bits(receiver.recv(sender.send(b)), b)
        assert same_bits(held, a)
        idle = receiver.buffers.idle_bytes()
        del held
        assert receiver.buffers.idle_bytes() > idle  # back in the pool once dropped
    finally:
        sender.close()


def test_async_recv_and_a_cancelled_wait_leaves_the_pair_working(receiver):
    sender = CollectiveKvSender(receiver.address, "async->d0", timeout_s=TIMEOUT_S)
    kv = payload([2, 2, 9, 2, 4], "bfloat16", 16)

    async def scenario():
        pending = await asyncio.to_thread(sender.submit, kv)
        got = await receiver.recv_async(pending.meta)  # may start before the bytes arrive
        assert (await pending.wait_async()) == pending.meta
        assert same_bits(got, kv)
        # a decode request aborted while waiting: the wait ends, the pair stays up
        ghost = TransferMeta(
            **{**pending.meta.to_dict(), "transfer_id": f"{pending.meta.epoch}#50", "seq": 50}
        )
        waiting = asyncio.create_task(receiver.recv_async(ghost))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        metas = await asyncio.gather(*(sender.send_async(kv) for _ in range(4)))
        assert {m.epoch for m in metas} == {pending.meta.epoch}
        for got in await asyncio.gather(*(receiver.recv_async(m) for m in reversed(metas))):
            assert same_bits(got, kv)

    try:
        asyncio.run(scenario())
    finally:
        sender.close()


def test_a_send_its_caller_cancelled_leaves_the_sender_working(receiver):
    # a request cancelled while its KV is being sent cancels the send's future (asyncio's
    # wrap_future does): the sender's thread must not die on it; the pair goes on, same group
    sender = CollectiveKvSender(receiver.address, "cancel->d0", timeout_s=TIMEOUT_S)
    kv = payload([2, 2, 9, 2, 4], "float32", 17)

    async def cancel_while_sending():
        pending = await asyncio.to_thread(sender.submit, kv)
        waiting = asyncio.ensure_future(pending.wait_async())
        await asyncio.sleep(0)
        waiting.cancel()
        return pending

    try:
        first = sender.send(kv)
        assert same_bits(receiver.recv(first), kv)
        cancelled = asyncio.run(cancel_while_sending())
        assert same_bits(receiver.recv(cancelled.meta), kv)  # the bytes still go out, in sequence
        after = sender.send(kv)
        assert after.epoch == first.epoch and same_bits(receiver.recv(after), kv)
    finally:
        sender.close()


def test_meta_that_disagrees_with_the_payload_is_rejected(receiver):
    sender = CollectiveKvSender(receiver.address, "liar->d0", timeout_s=TIMEOUT_S)
    try:
        meta = sender.send(payload([1, 2, 3, 1, 4], "float32", 13))
        forged = TransferMeta(**{**meta.to_dict(), "checksum": meta.checksum ^ 1})
        with pytest.raises(KvChecksumError):
            receiver.recv(forged)
    finally:
        sender.close()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL pairs need two GPUs (one per process)")
def test_nccl_pair_moves_cuda_payload_between_processes(sender):
    receiver = CollectiveKvReceiver("127.0.0.1", 0, device="cuda:0", timeout_s=30.0)
    try:
        spec = {"shape": [4, 2, 300, 2, 64], "dtype": "bfloat16", "seed": 21}
        (meta,) = sender.send(receiver.address, "gpu1->gpu0", [spec], device="cuda:1")
        assert meta.checksum_kind == "sum64"
        got = receiver.recv(meta)
        assert got.device == torch.device("cuda:0")
        assert same_bits(got.cpu(), payload(**spec))
    finally:
        receiver.close()


# --- the sender process ------------------------------------------------------------------


def _serve() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from shared.kv import KvSenderPool
    from shared.kv.collective import ANNOUNCE_QUEUE, SENDER_RANK, connect_store, epoch_prefix
    from shared.kv.pair_group import PairGroup

    pools: dict[str, KvSenderPool] = {}
    keep = []
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "send":
                device = cmd.get("device", "cpu")
                if device not in pools:
                    pools[device] = KvSenderPool(
                        device=device, timeout_s=30.0 if "cuda" in device else TIMEOUT_S
                    )
                sender = pools[device].get(cmd["address"], cmd["pair"])
                kvs = [payload(s["shape"], s["dtype"], s["seed"]).to(device) for s in cmd["specs"]]
                with ThreadPoolExecutor(cmd["threads"]) as ex:
                    metas = list(ex.map(sender.send, kvs))
                reply = {"metas": [m.to_dict() for m in metas]}
            elif cmd["op"] == "stall":
                # announce and join a pair group, then never send anything on it
                host, port = cmd["address"].rsplit(":", 1)
                epoch = "stall" + os.urandom(4).hex()
                client = connect_store(host, int(port), TIMEOUT_S)
                client.queue_push(
                    ANNOUNCE_QUEUE, json.dumps({"pair_name": cmd["pair"], "epoch": epoch, "backend": "gloo"})
                )
                keep.append(
                    PairGroup(
                        torch.distributed.PrefixStore(epoch_prefix(epoch), client),
                        SENDER_RANK,
                        "cpu",
                        TIMEOUT_S,
                    )
                )
                reply = {"epoch": epoch}
            else:
                reply = {"error": f"unknown op {cmd['op']}"}
        except Exception as e:  # report to the test instead of dying silently
            reply = {"error": repr(e)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    _serve()
