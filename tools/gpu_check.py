"""The GPU check: one command, about 5-10 minutes on one H100/H200, no network, that prints a table.

    python -m tools.gpu_check            (make gpu-check)
    python -m tools.gpu_check --device cpu --tiny    (the same steps on tiny models: a smoke test)

Needs torch with CUDA, triton and transformers (a GPU image has them); builds its models with
random weights, in bfloat16, in a temporary directory (tools/gpu_models.py): Llama-3.2-1B- and
Llama-3.1-8B-shaped checkpoints and a small local tokenizer. Rows, in order (each printed as
soon as it is measured, so a run cut short still shows what it got):

1. kernels: the Triton decode and varlen kernels against SDPA over gathered K/V, at real sizes.
2. bandwidth: a large device-to-device copy (bytes read + written per second): the HBM ceiling.
3. parity: greedy tokens of the engine (several prompts, one continuous batch, CUDA graphs on)
   against HF transformers one prompt at a time, on the 1B-shaped model in float32 (random
   weights leave near-ties that bfloat16 rounding alone can flip: a bfloat16 row reports how
   many tokens agree before the first difference, for information).
4. batch-1 decode tokens/s of the engine (bfloat16), 1B and 8B, and the ratio to the HBM bound:
   (weight bytes read per step + KV bytes at the mean context) / measured bandwidth. Goal >= 0.6.
5. saturation: many concurrent requests of mixed lengths through the engine against HF
   `generate` one request at a time and in static batches, same workload, same run.
   Goals: >= 15x and >= 2x.
6. decode step time with and without CUDA graphs at several batch sizes.
7. quantization on the 1B-shaped model: bf16 / int8 weights / fp8 KV / both (weight memory, KV
   blocks per GiB, saturation throughput, greedy agreement with bf16).

A JSON file with every figure goes to --out (default: $OUT/gpu_check.json when OUT is set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tools import gpu_models

GOALS = {"hbm_ratio": 0.6, "vs_hf_one": 15.0, "vs_hf_static": 2.0}


class Report:
    def __init__(self, out: str | None):
        self.rows: list[tuple[str, str, str]] = []
        self.data: dict = {}
        self.out = out

    def row(self, name: str, value: str, verdict: str = "", **data) -> None:
        self.rows.append((name, value, verdict))
        self.data[name] = {"value": value, "verdict": verdict, **data}
        print(f"  {name}: {value} {verdict}", flush=True)
        if self.out:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(self.data, indent=2, default=str))

    def table(self) -> str:
        lines = ["| check | result | goal / verdict |", "|---|---|---|"]
        lines += [f"| {n} | {v} | {g} |" for n, v, g in self.rows]
        return "\n".join(lines)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free() -> None:
    """Give memory back once the caller dropped its references (engines hold most of the GPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def goal(value: float, target: float) -> str:
    return f">= {target:g}: {'met' if value >= target else 'NOT met'}"


# -- 1. kernels -------------------------------------------------------------------------------
def check_kernels(rep: Report, device: str) -> None:
    from shared.engine.model import triton_attention as ta

    if not device.startswith("cuda"):
        rep.row("kernels vs SDPA", "skipped (the unit tests run them under TRITON_INTERPRET on cpu)")
        return
    from tests.helpers.attention_ref import block_tables, reference

    worst = 0.0
    g = torch.Generator().manual_seed(0)
    bs = 8  # the tests' block size (their table builder assumes it)
    for d, hq, hkv in ((64, 32, 8), (128, 32, 8), (128, 8, 8)):
        k = torch.randn(2048, bs, hkv, d, generator=g).bfloat16()
        v = torch.randn(2048, bs, hkv, d, generator=g).bfloat16()
        ctx = [1, 17, 1000, 3001]
        tables = block_tables(ctx, 2048, bs)
        q = torch.randn(len(ctx), hq, d, generator=g).bfloat16()
        cu = lambda t: t.to(device)  # noqa: E731
        out = ta.decode_attention(cu(q), cu(k), cu(v), cu(tables), cu(torch.tensor(ctx)), d ** -0.5, None,
                                  num_splits=8, block_n=32).float().cpu()
        ref = reference(q, k, v, tables, ctx, [1] * len(ctx), d ** -0.5)
        worst = max(worst, ((out - ref).norm() / ref.norm()).item())
        qlens = [1, 17, 300, 64]
        qv = torch.randn(sum(qlens), hq, d, generator=g).bfloat16()
        cuq = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
        out = ta.varlen_attention(cu(qv), cu(k), cu(v), cu(cuq), cu(torch.tensor(ctx, dtype=torch.int32)),
                                  cu(tables), max(qlens), d ** -0.5, 256).float().cpu()
        ref = reference(qv, k, v, tables, ctx, qlens, d ** -0.5, 256)
        worst = max(worst, ((out - ref).norm() / ref.norm()).item())
    rep.row("kernels vs SDPA (bf16, rel. error)", f"{worst:.2e}", "< 1e-2: " + ("ok" if worst < 1e-2 else "FAIL"),
            rel_error=worst)


# -- 2. bandwidth ---------------------------------------------------------------------------
def measure_bandwidth(rep: Report, device: str, tiny: bool) -> float:
    n = (64 << 20) if tiny else (4 << 30)  # bytes per buffer
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(5 if tiny else 20):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    bw = 2 * n / statistics.median(times)  # read + write
    rep.row("copy bandwidth (read+write)", f"{bw / 1e9:.0f} GB/s", "", bytes_per_s=bw)
    del src, dst
    free()
    return bw


# -- 3. parity ------------------------------------------------------------------------------
def prompts_for(vocab: int, n: int, lo: int, hi: int, seed: int, bos: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[bos] + [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi) - 1)] for _ in range(n)]


def hf_greedy(model, prompt: list[int], n: int, device: str) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def engine(path: Path, device: str, dtype: str, **kw):
    from shared.engine import EngineConfig, LLMEngine

    eng = LLMEngine(EngineConfig(model=str(path), device=device, dtype=dtype, enable_prefix_caching=False, **kw))
    if not device.startswith("cuda"):  # cpu: the same graph bookkeeping, replayed eagerly (no CUDA graphs)
        from shared.engine.cuda_graphs import EagerReplayBackend

        eng.runner.enable_decode_graphs(eng.config.max_num_seqs, eng.max_model_len, backend=EagerReplayBackend())
    return eng


def check_parity(rep: Report, path: Path, device: str, tiny: bool) -> None:
    from shared.engine import SamplingParams
    from tools.bench.engine import _hf_model

    cfg = json.loads((path / "config.json").read_text())
    n_out = 8 if tiny else 32
    prompts = prompts_for(cfg["vocab_size"], 4 if tiny else 6, 5, 40 if tiny else 300, 1, cfg["bos_token_id"])
    for dtype in ("float32", "bfloat16"):
        hf = _hf_model(argparse.Namespace(model=str(path), dtype=dtype, device=device))
        refs = [hf_greedy(hf, p, n_out, device) for p in prompts]
        del hf
        free()
        eng = engine(path, device, dtype, max_num_seqs=8, kv_cache_memory=1 << 30, max_model_len=1024)
        outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True))
        replays = sum(eng.runner.graphs.replays.values()) if eng.runner.graphs else 0
        del eng
        free()
        same = sum(o == r for o, r in zip(outs, refs, strict=True))
        agree = sum(next((i for i, (a, b) in enumerate(zip(o, r, strict=True)) if a != b), len(r))
                    for o, r in zip(outs, refs, strict=True))
        total = len(prompts) * n_out
        if dtype == "float32":
            verdict = "all identical: " + ("ok" if same == len(prompts) else "FAIL")
            rep.row("greedy parity with HF (1B-shaped, float32)",
                    f"{same}/{len(prompts)} prompts identical ({replays} graph replays)", verdict, outputs=outs,
                    refs=refs)
        else:
            rep.row("greedy agreement with HF (1B-shaped, bfloat16)",
                    f"{agree}/{total} tokens before the first difference", "information (near-ties flip in bf16)")


# -- 4. batch-1 decode ----------------------------------------------------------------------
def weight_bytes_per_step(model) -> int:
    """Bytes of the weights one decode step reads: all of them, except an untied embedding
    table, of which a step reads one row."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def check_batch1(rep: Report, name: str, path: Path, device: str, bw: float, tiny: bool) -> None:
    from shared.engine import SamplingParams

    eng = engine(path, device, "bfloat16", max_num_seqs=4, max_model_len=2048,
                 kv_cache_memory=(64 << 20) if tiny else (4 << 30))
    cfg = eng.model_config
    prompt_len, n_out = (16, 16) if tiny else (128, 256)
    prompt = prompts_for(cfg.vocab_size, 1, prompt_len, prompt_len, 2, 1)[0]
    eng.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    eng.add_request("b1", prompt, SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True))
    eng.step()  # prefill + first token
    sync(device)
    t0 = time.perf_counter()
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    kv_row = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2  # bytes per token of context, bf16
    bytes_step = weight_bytes_per_step(eng.runner.model) + kv_row * (prompt_len + n_out // 2)
    ratio = bytes_step / bw / dt
    rep.row(f"batch-1 decode, {name}", f"{1 / dt:.1f} tok/s ({dt * 1e3:.2f} ms/step), "
            f"HBM-bound ratio {ratio:.2f}", goal(ratio, GOALS["hbm_ratio"]),
            tok_s=1 / dt, ratio=ratio, bytes_per_step=bytes_step)
    del eng
    free()


# -- 5. saturation --------------------------------------------------------------------------
def check_saturation(rep: Report, path: Path, device: str, args) -> None:
    from tools.bench.engine import _hf_model, run_hf_one, run_hf_static

    cfg = json.loads((path / "config.json").read_text())
    prompts = prompts_for(cfg["vocab_size"], args.num_prompts, 32 if not args.tiny else 4, args.max_input, 3,
                          cfg["bos_token_id"])
    eng = saturation_engine(path, device, args)
    outs, tandem = timed_generate(eng, prompts, args.output_len, device)
    assert all(len(o) == args.output_len for o in outs)
    blocks = eng.kv.pool.num_blocks
    check_graph_steps(rep, eng, device, args.tiny)
    del eng
    free()
    hf = _hf_model(argparse.Namespace(model=str(path), dtype="bfloat16", device=device))
    ns = argparse.Namespace(device=device, output_len=args.output_len, static_batch=args.static_batch)
    static = run_hf_static(ns, hf, prompts)
    step = max(1, len(prompts) // args.hf_one_prompts)
    one = run_hf_one(ns, hf, prompts[::step][: args.hf_one_prompts])
    del hf
    free()
    label = f"{len(prompts)} requests, {prompts and min(map(len, prompts))}-{max(map(len, prompts))} in, " \
            f"{args.output_len} out"
    rep.row("saturation: engine output tok/s", f"{tandem:.0f} ({label}; KV {blocks} blocks)", "", tok_s=tandem)
    rep.row("  vs HF one at a time", f"{tandem / one:.1f}x (HF {one:.1f} tok/s)", goal(tandem / one,
                                                                                       GOALS["vs_hf_one"]))
    rep.row(f"  vs HF static batches of {args.static_batch}", f"{tandem / static:.2f}x (HF {static:.0f} tok/s)",
            goal(tandem / static, GOALS["vs_hf_static"]))


def saturation_engine(path: Path, device: str, args, **kw):
    """The engine of the saturation and quantization rows: every prompt admitted at once."""
    return engine(path, device, "bfloat16", max_num_seqs=args.num_prompts, max_num_batched_tokens=2048,
                  max_model_len=args.max_input + args.output_len + 16, **kw)


def timed_generate(eng, prompts: list[list[int]], output_len: int, device: str) -> tuple[list[list[int]], float]:
    """(greedy outputs, output tokens per second) of all prompts at once, after a short warm-up."""
    from shared.engine import SamplingParams

    eng.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    sync(device)
    return outs, len(prompts) * output_len / (time.perf_counter() - t0)


# -- 7. quantization -----------------------------------------------------------------------
def check_quant(rep: Report, path: Path, device: str, args) -> None:
    """bf16 / int8 weights / fp8 KV / both on the 1B-shaped model: weight memory, KV blocks per GiB,
    saturation decode throughput and greedy agreement with bf16 (the CPU figures: make bench-quant)."""
    cfg = json.loads((path / "config.json").read_text())
    modes = {"bf16": ("none", "auto"), "int8 weights": ("int8", "auto"), "fp8 KV": ("none", "fp8"),
             "int8 weights + fp8 KV": ("int8", "fp8")}
    if cfg["head_dim"] % 32:
        modes = {k: v for k, v in modes.items() if v[1] == "auto"}
        rep.row("quant: 8-bit KV", f"skipped (head_dim {cfg['head_dim']} not divisible by 32)")
    prompts = prompts_for(cfg["vocab_size"], args.num_prompts, 32 if not args.tiny else 4, args.max_input, 5,
                          cfg["bos_token_id"])
    base = None
    for name, (quantization, kv) in modes.items():
        eng = saturation_engine(path, device, args, quantization=quantization, kv_cache_dtype=kv)
        outs, tok_s = timed_generate(eng, prompts, args.output_len, device)
        weights, per_block = eng.runner.weight_bytes(), eng.runner.kv_bytes_per_block(eng.block_size)
        base = base or (weights, per_block, tok_s, outs)
        same = sum(a == b for o, r in zip(outs, base[3], strict=True) for a, b in zip(o, r, strict=True))
        rep.row(f"quant: {name}", f"weights {weights / 2**20:.0f} MiB ({weights / base[0]:.2f}x), KV blocks/GiB "
                f"{(1 << 30) // per_block} ({base[1] / per_block:.2f}x), {tok_s:.0f} tok/s ({tok_s / base[2]:.2f}x), "
                f"greedy identical {same / sum(map(len, outs)):.0%}", "", tok_s=tok_s, weight_bytes=weights)
        del eng
        free()


# -- 6. CUDA graphs -------------------------------------------------------------------------
def check_graph_steps(rep: Report, eng, device: str, tiny: bool) -> None:
    """Decode step time (runner.forward of B one-token sequences at context 256), graphs vs eager."""
    from shared.engine.runner import SeqInput

    runner = eng.runner
    if runner.graphs is None:
        rep.row("decode step, CUDA graphs", "skipped (graphs off)")
        return
    ctx, bs = (32 if tiny else 256), runner.block_size
    per_seq = -(-ctx // bs)
    results = []
    for b in [x for x in (1, 16, 64) if x <= runner.graphs.max_batch and b_fits(eng, x, per_seq)]:
        seqs = [SeqInput([5] * ctx, ctx - 1, 1, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(b)]
        times = {}
        for mode in ("graph", "eager"):
            saved = runner.graphs
            runner.graphs = saved if mode == "graph" else None
            for _ in range(3):
                runner.forward([], seqs, [1] * b)
            ts = []
            for _ in range(5 if tiny else 30):
                sync(device)
                t0 = time.perf_counter()
                runner.forward([], seqs, [1] * b)
                sync(device)
                ts.append(time.perf_counter() - t0)
            runner.graphs = saved
            times[mode] = statistics.median(ts)
        results.append(f"B={b}: {times['eager'] * 1e3:.2f} -> {times['graph'] * 1e3:.2f} ms")
    rep.row("decode step, eager -> CUDA graphs (1B)", "; ".join(results), "")


def b_fits(eng, b: int, per_seq: int) -> bool:
    return b * per_seq <= eng.kv.pool.num_blocks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models and counts (a smoke test, e.g. on cpu)")
    p.add_argument("--skip-8b", action="store_true")
    p.add_argument("--num-prompts", type=int, default=128, help="concurrent requests in the saturation run")
    p.add_argument("--max-input", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--static-batch", type=int, default=16)
    p.add_argument("--hf-one-prompts", type=int, default=4)
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--out", default=os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT")
                   else None)
    args = p.parse_args(argv)
    if args.tiny:
        args.num_prompts, args.max_input, args.output_len = min(args.num_prompts, 6), 24, 4
        args.static_batch, args.hf_one_prompts = 2, 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --tiny for the smoke test", file=sys.stderr)
        return 2
    gpu_models.ensure_structlog()
    start = time.perf_counter()
    rep = Report(args.out)
    from tools.bench.machine import machine_info

    print(f"gpu_check on {machine_info(args.device)['label']}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        check_kernels(rep, args.device)
        bw = measure_bandwidth(rep, args.device, args.tiny)
        small = gpu_models.build(Path(tmp) / "llama-1b", "1b", args.device, args.tiny)
        check_parity(rep, small, args.device, args.tiny)
        check_batch1(rep, "1B-shaped", small, args.device, bw, args.tiny)
        check_saturation(rep, small, args.device, args)
        check_quant(rep, small, args.device, args)
        if not args.skip_8b:
            big = gpu_models.build(Path(tmp) / "llama-8b", "8b", args.device, args.tiny)
            check_batch1(rep, "8B-shaped", big, args.device, bw, args.tiny)
    print(f"\n{rep.table()}\n\n({time.perf_counter() - start:.0f} s)")
    return 0 if all("FAIL" not in v and "FAIL" not in g for _, v, g in rep.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
