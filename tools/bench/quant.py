"""Quantization, one run: weight memory, KV blocks in one budget, decode throughput at saturation,
held-out perplexity and greedy agreement, for bf16 / int8 weights / 8-bit KV / both.

Models: the demo model, and a random-weight model of Llama-3.2-1B's width (hidden 2048, 32 query /
8 KV heads of 64, FFN 8192, vocab 128256, tied embeddings) with --big-layers of its 16 layers,
written here (no download). Perplexity and agreement only mean something for the trained demo
model (on the held-out half of tools/train_demo's stdlib split); the big model gives the memory
and speed figures. Also times the int8 linear against the bf16 one at the big model's shapes.

Decode throughput is measured twice: with the same batch in every mode (what each format costs
per token), and with the same KV memory (a server at saturation, where the budget bounds the
batch: an 8-bit cache holds 1.94x the sequences of a bf16 one).
"""

from __future__ import annotations

import gc
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from tools.bench.machine import loadavg, machine_info

MODES = {  # name -> (TANDEM_QUANTIZATION, TANDEM_KV_CACHE_DTYPE)
    "bf16": ("none", "auto"),
    "int8 weights": ("int8", "auto"),
    "fp8 KV": ("none", "fp8"),
    "int8 KV": ("none", "int8"),
    "int8 weights + fp8 KV": ("int8", "fp8"),
}
KV_BUDGET = 1 << 30  # TANDEM_KV_CACHE_MEMORY's default
BLOCK = 16


def add_parser(sub) -> None:
    p = sub.add_parser("quant", help="int8 weights and 8-bit KV against bf16: memory, speed, quality")
    p.add_argument("--model", default="models/tandem-demo-code/target")
    p.add_argument("--big-layers", type=int, default=4, help="layers of the Llama-3.2-1B-wide model (0: skip it)")
    p.add_argument("--big-dir", default="bench-results/llama-1b-shaped")
    p.add_argument("--seqs", type=int, default=64, help="demo model: sequences decoding at once")
    p.add_argument("--big-seqs", type=int, default=32)
    p.add_argument("--budget-seqs", type=int, default=64,
                   help="demo model: sequences of bf16 KV the same-budget run's budget holds (0: skip that run)")
    p.add_argument("--big-budget-seqs", type=int, default=32)
    p.add_argument("--budget-steps", type=int, default=16, help="decode steps of the same-budget run")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--ppl-seqs", type=int, default=16, help="held-out windows of --ppl-len tokens")
    p.add_argument("--ppl-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-results/quant.json")
    p.add_argument("--markdown", default=None)
    p.set_defaults(func=run)


# -- models -------------------------------------------------------------------------------------

def build_llama_1b_shaped(path: Path, layers: int, seed: int = 0) -> Path:
    """Llama-3.2-1B's shapes with random bf16 weights (std 0.02), as an HF checkpoint directory."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    h, inter, heads, kv, d, vocab = 2048, 8192, 32, 8, 64, 128256
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
    }
    cfg_text = json.dumps(cfg, indent=1)
    if (path / "config.json").is_file() and (path / "config.json").read_text() == cfg_text:
        return path  # built by an earlier run
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    state = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": w(heads * d, h), p + "self_attn.k_proj.weight": w(kv * d, h),
            p + "self_attn.v_proj.weight": w(kv * d, h), p + "self_attn.o_proj.weight": w(h, heads * d),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(cfg_text)
    return path


def _engine(model: str, mode: str, seqs: int, num_blocks: int):
    from shared.engine import EngineConfig, LLMEngine

    quantization, kv = MODES[mode]
    return LLMEngine(EngineConfig(model=model, dtype="bfloat16", quantization=quantization, kv_cache_dtype=kv,
                                  num_blocks=num_blocks, block_size=BLOCK, max_num_seqs=seqs,
                                  max_num_batched_tokens=2048))


# -- measurements -------------------------------------------------------------------------------

def interleaved_throughput(engines: dict, prompts: list[list[int]], steps: int,
                           counts: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Decode tokens/s of each engine, with every sequence running (prefill excluded), the engines
    taking turns step by step (the order rotating), so that a change in the host's load hits
    every mode alike. Each engine runs the first counts[mode] prompts (all by default).
    Returns each mode's per-step tokens/s; callers take the median."""
    from shared.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for mode, engine in engines.items():
        mine = prompts[: (counts or {}).get(mode, len(prompts))]
        for i, p in enumerate(mine):
            engine.add_request(f"{mode}-{i}", p, params)
        started: set[str] = set()
        while len(started) < len(mine):  # prefill (in chunks) until each has its first token
            started.update(o.request_id for o in engine.step() if o.new_token_ids)
    rates: dict[str, list[float]] = {mode: [] for mode in engines}
    order = list(engines)
    for step in range(steps):
        for mode in order[step % len(order):] + order[: step % len(order)]:
            t0 = time.perf_counter()
            tokens = sum(len(o.new_token_ids) for o in engines[mode].step())
            rates[mode].append(tokens / (time.perf_counter() - t0))
    for engine in engines.values():
        while engine.has_unfinished():
            engine.step()
    return rates


@torch.inference_mode()
def perplexity(engine, windows: list[list[int]]) -> float:
    """exp(mean NLL) of next-token prediction over each window, through the engine's paged forward
    (keys and values written to, and read back from, its cache in the cache's format)."""
    from shared.engine.runner import SeqInput

    nll, count = 0.0, 0
    for w in windows:
        blocks = list(range(-(-len(w) // BLOCK)))
        logits = engine.runner.forward([SeqInput(w, 0, len(w), blocks)], [], [len(w)])  # [L, V]
        lp = torch.log_softmax(logits[:-1].float(), dim=-1)
        target = torch.tensor(w[1:])
        nll -= lp.gather(1, target[:, None]).sum().item()
        count += len(w) - 1
    return math.exp(nll / count)


def heldout_windows(model: str, n: int, length: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    from tools.train_demo import stdlib_texts

    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    stream: list[int] = []
    for _, text in stdlib_texts(heldout=True):
        stream.extend(tok.encode(text).ids[1:])
        if len(stream) >= n * length * 4:
            break
    stride = len(stream) // n
    return [[1, *stream[i * stride: i * stride + length - 1]] for i in range(n)]


def greedy_agreement(outs: list[list[int]], ref: list[list[int]]) -> float:
    same = sum(a == b for o, r in zip(outs, ref, strict=True) for a, b in zip(o, r, strict=True))
    return same / sum(len(r) for r in ref)


def linear_timings(rows_list=(1, 4, 16, 64, 256), k: int = 2048, n: int = 8192) -> list[dict]:
    """ms per call of one Llama-1B-wide projection (gate/up: 2048 -> 8192), int8 path vs bf16."""
    import torch.nn.functional as F

    from shared.engine.model import quant

    w = torch.randn(n, k) * 0.02
    q, s = quant.quantize_weight(w)
    wb = w.to(torch.bfloat16)
    out = []
    for rows in rows_list:
        x = torch.randn(rows, k).to(torch.bfloat16)
        t_int8 = _best_ms(lambda: quant.int8_linear(x, q, s))  # noqa: B023
        t_bf16 = _best_ms(lambda: F.linear(x, wb))  # noqa: B023
        out.append({"rows": rows, "int8_ms": t_int8, "bf16_ms": t_bf16, "ratio": t_bf16 / t_int8})
    return out


def _best_ms(fn, n: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


# -- the run ------------------------------------------------------------------------------------

def budget_throughput(model: str, rows: dict[str, dict], prompts: list[list[int]], steps: int,
                      bf16_seqs: int) -> None:
    """Decode throughput when the KV budget, not the batch limit, bounds the batch (a server at
    saturation): the budget holds bf16_seqs sequences of prompt + steps tokens in bf16, and
    each mode runs as many sequences as that budget holds in its own KV format. Adds
    budget_bytes, budget_seqs and budget_tok_s to each mode's row."""
    per_seq = -(-(len(prompts[0]) + steps + 2) // BLOCK)
    budget = bf16_seqs * per_seq * rows["bf16"]["kv_bytes_per_block"]
    blocks = {mode: budget // rows[mode]["kv_bytes_per_block"] for mode in MODES}
    counts = {mode: n // per_seq for mode, n in blocks.items()}
    if len(prompts) < max(counts.values()):  # a repeated prompt would share its blocks through the prefix cache
        raise ValueError(f"the same-KV-memory run needs {max(counts.values())} distinct prompts, got {len(prompts)}")
    engines = {mode: _engine(model, mode, counts[mode], blocks[mode]) for mode in MODES}
    for mode, rates in interleaved_throughput(engines, prompts, steps, counts).items():
        rows[mode].update(budget_bytes=budget, budget_seqs=counts[mode], budget_tok_s=statistics.median(rates))
    del engines
    gc.collect()


def bench_model(model: str, label: str, args, seqs: int, quality: bool, budget_seqs: int) -> dict:
    import random

    rng = random.Random(0)
    from shared.engine import ModelConfig, SamplingParams

    vocab = ModelConfig.from_dir(model).vocab_size
    # distinct prompts for the same-KV-memory run too, where an 8-bit cache holds up to 2x the sequences
    prompts = [[1, *(rng.randrange(3, vocab) for _ in range(args.prompt_len - 1))]
               for _ in range(2 * max(seqs, budget_seqs))]
    need = seqs * -(-(args.prompt_len + args.decode_steps + 2) // BLOCK) + 8
    windows = heldout_windows(model, args.ppl_seqs, args.ppl_len) if quality else []
    need = max(need, -(-args.ppl_len // BLOCK) + 8)
    gen_prompts = [w[:48] for w in windows[:8]]
    rows: dict[str, dict] = {}
    for mode in MODES:
        engine = _engine(model, mode, seqs, need)
        r = rows[mode] = {
            "weight_bytes": engine.runner.weight_bytes(),
            "kv_bytes_per_block": engine.runner.kv_bytes_per_block(BLOCK),
            "kv_blocks_in_budget": KV_BUDGET // engine.runner.kv_bytes_per_block(BLOCK),
            "tok_s": [],
        }
        if quality:
            r["perplexity"] = perplexity(engine, windows)
            r["greedy"] = engine.generate(gen_prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
        del engine
        gc.collect()
        print(f"[{label}] {mode}: {r['weight_bytes'] / 2**20:.1f} MiB weights"
              + (f", ppl {r['perplexity']:.3f}" if quality else ""), file=sys.stderr)
    engines = {mode: _engine(model, mode, seqs, need) for mode in MODES}
    for mode, rates in interleaved_throughput(engines, prompts[:seqs], args.decode_steps).items():
        rows[mode]["tok_s"] = rates
        print(f"[{label}] {mode}: median {statistics.median(rates):.1f} tok/s", file=sys.stderr)
    del engines
    gc.collect()
    if budget_seqs:
        budget_throughput(model, rows, prompts, args.budget_steps, budget_seqs)
        print(f"[{label}] same KV budget: " + ", ".join(
            f"{mode} {r['budget_seqs']} seqs {r['budget_tok_s']:.1f} tok/s" for mode, r in rows.items()), file=sys.stderr)
    base = rows["bf16"]
    ref_greedy = base.get("greedy")
    for r in rows.values():
        r["decode_tok_s"] = statistics.median(r["tok_s"])
        r["weights_vs_bf16"] = r["weight_bytes"] / base["weight_bytes"]
        r["kv_capacity_vs_bf16"] = r["kv_blocks_in_budget"] / base["kv_blocks_in_budget"]
        r["throughput_vs_bf16"] = r["decode_tok_s"] / statistics.median(base["tok_s"])
        if budget_seqs:
            r["budget_throughput_vs_bf16"] = r["budget_tok_s"] / base["budget_tok_s"]
        if quality:
            r["perplexity_vs_bf16"] = r["perplexity"] / base["perplexity"]
            r["greedy_identical"] = greedy_agreement(r.pop("greedy"), ref_greedy)
    return {"model": model, "label": label, "seqs": seqs, "budget_seqs": budget_seqs, "rows": rows}


def run(args) -> int:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    results = {
        "command": "python -m tools.bench " + shlex.join(sys.argv[1:] if sys.argv[0].endswith("__main__.py")
                                                         else sys.argv),
        "machine": machine_info("cpu"), "loadavg_start": loadavg(), "threads": args.threads,
        "kv_budget_bytes": KV_BUDGET, "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
        "budget_steps": args.budget_steps,
        "ppl": {"windows": args.ppl_seqs, "tokens": args.ppl_len},
        "linear": linear_timings(),
        "models": [bench_model(args.model, "demo", args, args.seqs, quality=True, budget_seqs=args.budget_seqs)],
    }
    if args.big_layers:
        big = build_llama_1b_shaped(Path(args.big_dir), args.big_layers)
        results["models"].append(bench_model(str(big), f"Llama-3.2-1B-wide, {args.big_layers} layers", args,
                                             args.big_seqs, quality=False, budget_seqs=args.big_budget_seqs))
    results["loadavg_end"] = loadavg()
    results["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    md = report(results)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    print(md)
    return 0


def report(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ", f"Machine: {res['machine']['label']}, torch {res['machine']['torch']}, "
             f"{res['threads']} thread(s); load average {res['loadavg_start']} -> {res['loadavg_end']}; "
             f"{res['seconds']:.0f} s.", ""]
    for m in res["models"]:
        quality = "perplexity" in m["rows"]["bf16"]
        lines += [f"**{m['label']}** (`{m['model']}`): decode of {m['seqs']} sequences at once "
                  f"({res['prompt_len']}-token prompts; median of {res['decode_steps']} steps, the modes taking "
                  "turns step by step), KV budget "
                  f"{res['kv_budget_bytes'] >> 20} MiB, block {BLOCK} tokens" +
                  (f"; perplexity on {res['ppl']['windows']} held-out windows of {res['ppl']['tokens']} tokens; "
                   "greedy agreement: share of 8 x 32 greedy tokens identical to bf16, position by position"
                   if quality else "") + ".", ""]
        budget = m.get("budget_seqs")
        if budget:
            b = m["rows"]["bf16"]
            lines += [f"Same KV budget: {b['budget_bytes'] / 2**20:.1f} MiB of KV, what {budget} bf16 sequences of "
                      "this length take; each mode decodes as many sequences as the budget holds in its format "
                      f"(median of {res.get('budget_steps', '?')} steps, the modes taking turns).", ""]
        head = "| mode | weights MiB | vs bf16 | KV blocks in budget | vs bf16 | decode tok/s | vs bf16 |"
        sep = "|---|---|---|---|---|---|---|"
        if budget:
            head += " same KV budget: sequences | tok/s | vs bf16 |"
            sep += "---|---|---|"
        if quality:
            head += " perplexity | vs bf16 | greedy identical |"
            sep += "---|---|---|"
        lines += [head, sep]
        for mode, r in m["rows"].items():
            line = (f"| {mode} | {r['weight_bytes'] / 2**20:.1f} | {r['weights_vs_bf16']:.3f}x | "
                    f"{r['kv_blocks_in_budget']} | {r['kv_capacity_vs_bf16']:.3f}x | {r['decode_tok_s']:.1f} | "
                    f"{r['throughput_vs_bf16']:.2f}x |")
            if budget:
                line += f" {r['budget_seqs']} | {r['budget_tok_s']:.1f} | {r['budget_throughput_vs_bf16']:.2f}x |"
            if quality:
                line += f" {r['perplexity']:.3f} | {r['perplexity_vs_bf16']:.4f}x | {r['greedy_identical']:.1%} |"
            lines.append(line)
        lines.append("")
    lines += ["int8 linear vs bf16 `F.linear`, one 2048 -> 8192 projection (ms, best of 5):", "",
              "| rows | int8 | bf16 | bf16 / int8 |", "|---|---|---|---|"]
    lines += [f"| {t['rows']} | {t['int8_ms']:.2f} | {t['bf16_ms']:.2f} | {t['ratio']:.2f}x |" for t in res["linear"]]
    return "\n".join(lines) + "\n"
