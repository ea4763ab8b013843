"""KV transfer bandwidth against a memcpy baseline on this host.

    python -m tools.bench_kv [--layers 16 --tokens 2048 --heads 8 --head-dim 64 --dtype bfloat16]

Paths measured on one payload `[layers, 2, tokens, heads, head_dim]`:
- memcpy: `kv.clone()` (the baseline of the ratios), and `dst.copy_(kv)` into a
  preallocated tensor for reference.
- chunks: `split_kv` -> bytes -> `KvAssembler.add` -> scatter into a preallocated tensor,
  in one process (the data path without the network).
- grpc: the same chunks streamed by a gRPC server in a second process (generic bytes
  method, a small struct header in front of each chunk's bytes, as a proto would carry
  them), assembled by the client here.
- collective: `CollectiveKvSender` in a second process -> `CollectiveKvReceiver` here,
  gloo on CPU (nccl when --device cuda), checksums included.

Prints GB/s (1e9 bytes/s; median and best of --repeat runs) and the ratios to memcpy
that the design targets: grpc >= 0.05, collective >= 0.25. Both memcpy figures are
given: clone allocates (fresh pages fault on first touch, which dominates on a VM for
payloads over glibc's 32 MiB mmap threshold), copy_ writes into warm memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from shared.kv import CollectiveKvReceiver, KvAssembler, KvChunk, KvSenderPool, TransferMeta, split_kv

_METHOD = "/tandem.bench.KvBench/Stream"
# index, total, layer_start, layer_end, token_start, token_end, crc32, 5 shape dims, dtype name
_HEADER = struct.Struct("<6qQ5q16s")


def make_payload(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (args.layers, 2, args.tokens, args.heads, args.head_dim)
    return torch.randn(shape, generator=g).to(getattr(torch, args.dtype))


def encode(c: KvChunk) -> bytes:
    head = _HEADER.pack(
        c.index,
        c.total,
        c.layer_start,
        c.layer_end,
        c.token_start,
        c.token_end,
        c.crc32,
        *c.shape,
        c.dtype.encode(),
    )
    return head + c.data


def decode(msg: bytes) -> KvChunk:
    *ints, dtype = _HEADER.unpack_from(msg)
    return KvChunk(
        index=ints[0],
        total=ints[1],
        layer_start=ints[2],
        layer_end=ints[3],
        token_start=ints[4],
        token_end=ints[5],
        crc32=ints[6],
        shape=tuple(ints[7:12]),
        dtype=dtype.rstrip(b"\0").decode(),
        data=msg[_HEADER.size :],
    )


def scatter_all(pieces, out: torch.Tensor) -> None:
    for tensor, l0, t0 in pieces:
        # tensor: [n_layers, 2, n_tokens, H, D] -> out[l0:l0+n_layers, :, t0:t0+n_tokens]
        out[l0 : l0 + tensor.shape[0], :, t0 : t0 + tensor.shape[2]] = tensor


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up: lazy initialisation, group set-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# --- the second process ---------------------------------------------------------------


def serve(args) -> None:
    """gRPC server + collective sender; commands on stdin, replies on stdout."""
    kv = make_payload(args)

    def stream(request: bytes, context):
        for chunk in split_kv(kv, args.chunk_bytes):
            yield encode(chunk)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "tandem.bench.KvBench", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"grpc_port": port}), flush=True)
    pool = KvSenderPool(device=args.device)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "collective":
            sender = pool.get(cmd["address"], "bench")
            src = kv.to(args.device)
            metas = [sender.send(src).to_dict() for _ in range(cmd["n"])]
            print(json.dumps({"metas": metas}), flush=True)
        else:
            break
    pool.close()
    server.stop(0)
    # skip the interpreter's teardown, as the services do: destroying the gloo group's threads
    # there aborts the process ("terminate called without an active exception")
    sys.stdout.flush()
    os._exit(0)


# --- the measuring process --------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda:N (nccl; the sender uses cuda:N+1)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (workers limit theirs; see DESIGN.md)",
    )
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.serve:
        serve(args)
        return

    kv = make_payload(args)
    nbytes = kv.numel() * kv.element_size()
    results: dict[str, list[float]] = {}
    dst = torch.empty_like(kv)
    results["memcpy (clone)"] = timed(lambda: kv.clone(), args.repeat)
    results["memcpy (copy_ into preallocated)"] = timed(lambda: dst.copy_(kv), args.repeat)

    def chunks_in_process():
        asm = KvAssembler(kv.shape, kv.dtype)
        scatter_all((asm.add(c) for c in split_kv(kv, args.chunk_bytes)), dst)
        assert asm.complete

    results["chunks in-process (split+assemble)"] = timed(chunks_in_process, args.repeat)
    assert torch.equal(dst.view(torch.uint8), kv.view(torch.uint8))

    sender_device = args.device
    if args.device.startswith("cuda"):
        sender_device = f"cuda:{torch.device(args.device).index + 1}"
    serve_argv = [
        f"--layers={args.layers}",
        f"--tokens={args.tokens}",
        f"--heads={args.heads}",
        f"--head-dim={args.head_dim}",
        f"--dtype={args.dtype}",
        f"--chunk-bytes={args.chunk_bytes}",
        f"--device={sender_device}",
        f"--threads={args.threads}",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.bench_kv", "--serve", *serve_argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        grpc_port = json.loads(proc.stdout.readline())["grpc_port"]
        channel = grpc.insecure_channel(
            f"127.0.0.1:{grpc_port}", options=[("grpc.max_receive_message_length", 8 << 20)]
        )
        call = channel.unary_stream(_METHOD)
        dst.zero_()

        def grpc_stream():
            asm = KvAssembler(kv.shape, kv.dtype)
            scatter_all((asm.add(decode(m)) for m in call(b"")), dst)
            assert asm.complete

        results["grpc stream, 2 processes"] = timed(grpc_stream, args.repeat)
        assert torch.equal(dst.view(torch.uint8), kv.view(torch.uint8))
        channel.close()

        receiver = CollectiveKvReceiver("127.0.0.1", 0, device=args.device)

        def collective():
            proc.stdin.write(json.dumps({"op": "collective", "address": receiver.address, "n": 1}) + "\n")
            proc.stdin.flush()
            (meta,) = json.loads(proc.stdout.readline())["metas"]
            return receiver.recv(TransferMeta.from_dict(meta))

        results["collective (gloo), 2 processes" if args.device == "cpu" else "collective (nccl)"] = timed(
            collective, args.repeat
        )
        got = collective()
        assert torch.equal(got.cpu().view(torch.uint8), kv.view(torch.uint8))
        receiver.close()
        proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        proc.stdin.flush()
        if proc.wait(timeout=30):
            raise RuntimeError(f"the sending process exited with code {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()

    clone = statistics.median(results["memcpy (clone)"])
    copy = statistics.median(results["memcpy (copy_ into preallocated)"])
    print(
        f"payload {args.dtype}{list(kv.shape)} = {nbytes / 1e6:.1f} MB, chunks of {args.chunk_bytes} B, "
        f"{args.repeat} runs, {os.cpu_count()} CPUs, {args.threads} torch thread(s)/process, torch {torch.__version__}"
    )
    print(
        f"{'path':36s} {'median ms':>10s} {'GB/s med':>9s} {'GB/s best':>10s} {'/clone':>7s} {'/copy_':>7s}"
    )
    for name, times in results.items():
        med = statistics.median(times)
        print(
            f"{name:36s} {med * 1e3:10.2f} {nbytes / med / 1e9:9.3f} {nbytes / min(times) / 1e9:10.3f} "
            f"{clone / med:7.3f} {copy / med:7.3f}"
        )
    print("ratios are medians; targets: grpc >= 0.05, collective >= 0.25 of memcpy")
    print("clone = memcpy into fresh memory (page faults included); copy_ = into warm memory")


if __name__ == "__main__":
    main()
