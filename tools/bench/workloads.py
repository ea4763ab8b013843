"""Synthetic, seeded workloads and arrival processes of the serving benchmark.

Prompts are token ids drawn from the model's vocabulary (ids 0-2, the usual special tokens,
are avoided; the BOS id leads when the model has one), sent verbatim, so every system sees
exactly the same input lengths. Every request sets max_tokens and ignore_eos, so output
lengths are the workload's, not the model's whim.

- fixed:  every request has the same input and output length (vLLM's "random" dataset with
          range ratio 0).
- mixed:  chat-like long tails: input and output lengths log-normal (median, sigma), clipped
          to [lo, hi] and to the model length.
- prefix: one long system prompt shared by every request, then a short distinct question;
          short outputs. What a prefix cache is for.
- code:   natural text: windows of Python source from the standard library files the demo
          model held out of training (tools/train_demo.py's split), tokenized by the model's
          tokenizer. Speculation needs a continuation a draft can guess, which random ids are not.

Arrivals (`arrival_offsets`): all at once (rate inf), Poisson (burstiness 1), or gamma
inter-arrival times with shape = burstiness and mean 1/rate (as `vllm bench serve`: < 1 is
burstier, > 1 smoother). Knows nothing of gRPC or engines.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORKLOADS = ("fixed", "mixed", "prefix", "code")
FIRST_ORDINARY_ID = 3


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    output_len: int


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    max_model_len: int
    bos_token_id: int | None
    tokenizer_path: str | None = None  # tokenizer.json, for the code workload


@dataclass(frozen=True)
class WorkloadSpec:
    """Sizes of the three workloads; `fit` shrinks them to a model's length."""

    fixed_input: int = 256
    fixed_output: int = 128
    mixed_input_median: float = 128
    mixed_input_sigma: float = 1.0
    mixed_input_range: tuple[int, int] = (8, 768)
    mixed_output_median: float = 64
    mixed_output_sigma: float = 0.8
    mixed_output_range: tuple[int, int] = (4, 256)
    prefix_len: int = 768
    question_range: tuple[int, int] = (16, 48)
    prefix_output: int = 32
    code_input: int = 128
    code_output: int = 128


def _tokens(rng: np.random.Generator, n: int, shape: ModelShape) -> list[int]:
    return rng.integers(FIRST_ORDINARY_ID, shape.vocab_size, size=n).tolist()


def _with_bos(body: list[int], shape: ModelShape) -> list[int]:
    return ([shape.bos_token_id] if shape.bos_token_id is not None else []) + body


def fixed(n: int, spec: WorkloadSpec, shape: ModelShape, seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    out_len = min(spec.fixed_output, shape.max_model_len - 2)
    in_len = max(2, min(spec.fixed_input, shape.max_model_len - out_len))
    bos = shape.bos_token_id is not None
    return [BenchRequest(_with_bos(_tokens(rng, in_len - bos, shape), shape), out_len) for _ in range(n)]


def _lognormal_lengths(rng, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    raw = rng.lognormal(mean=math.log(median), sigma=sigma, size=n)
    return np.clip(np.rint(raw), lo, hi).astype(int)


def mixed(n: int, spec: WorkloadSpec, shape: ModelShape, seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    ins = _lognormal_lengths(rng, n, spec.mixed_input_median, spec.mixed_input_sigma, *spec.mixed_input_range)
    outs = _lognormal_lengths(
        rng, n, spec.mixed_output_median, spec.mixed_output_sigma, *spec.mixed_output_range
    )
    bos = shape.bos_token_id is not None
    requests = []
    for in_len, out_len in zip(ins.tolist(), outs.tolist(), strict=True):
        out_len = min(out_len, shape.max_model_len // 2)
        in_len = max(1 + bos, min(in_len, shape.max_model_len - out_len))
        requests.append(BenchRequest(_with_bos(_tokens(rng, in_len - bos, shape), shape), out_len))
    return requests


def prefix(n: int, spec: WorkloadSpec, shape: ModelShape, seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    q_lo, q_hi = spec.question_range
    out_len = spec.prefix_output
    prefix_len = min(spec.prefix_len, shape.max_model_len - q_hi - out_len)
    if prefix_len < 1:
        raise ValueError(f"model length {shape.max_model_len} leaves no room for a shared prefix")
    system = _with_bos(_tokens(rng, prefix_len - (shape.bos_token_id is not None), shape), shape)
    return [
        BenchRequest(system + _tokens(rng, int(rng.integers(q_lo, q_hi + 1)), shape), out_len)
        for _ in range(n)
    ]


def heldout_sources(root: Path | None = None) -> list[Path]:
    """The stdlib .py files the demo model did not train on, sorted (its split: about 1 in 20 by path)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "__pycache__" in rel:
            continue
        if hashlib.sha256(rel.encode()).digest()[0] < 13:  # tools/train_demo.py: is_heldout
            out.append(path)
    return out


def code(n: int, spec: WorkloadSpec, shape: ModelShape, seed: int) -> list[BenchRequest]:
    """Windows of held-out Python source starting at a line, `code_input` tokens each."""
    if not shape.tokenizer_path:
        raise ValueError("the code workload needs the model's tokenizer.json")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(shape.tokenizer_path)
    out_len = min(spec.code_output, shape.max_model_len // 2)
    in_len = min(spec.code_input, shape.max_model_len - out_len) - (shape.bos_token_id is not None)
    rng = np.random.default_rng(seed)
    files = heldout_sources()
    requests = []
    for _ in range(50 * n):
        if len(requests) == n:
            break
        try:
            lines = files[int(rng.integers(len(files)))].read_text(encoding="utf-8").splitlines(keepends=True)
        except (OSError, UnicodeDecodeError):
            continue
        start = int(rng.integers(max(1, len(lines) - 20)))
        ids = tok.encode("".join(lines[start:]), add_special_tokens=False).ids
        if len(ids) >= in_len:
            ids = [min(i, shape.vocab_size - 1) for i in ids[:in_len]]
            requests.append(BenchRequest(_with_bos(ids, shape), out_len))
    if len(requests) < n:
        raise ValueError(f"found {len(requests)} source windows of {in_len} tokens, wanted {n}")
    return requests


def make_workload(name: str, n: int, spec: WorkloadSpec, shape: ModelShape, seed: int) -> list[BenchRequest]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    return {"fixed": fixed, "mixed": mixed, "prefix": prefix, "code": code}[name](n, spec, shape, seed)


def describe(requests: list[BenchRequest]) -> dict:
    """Length statistics of a workload, for the report."""
    ins = np.array([len(r.prompt) for r in requests])
    outs = np.array([r.output_len for r in requests])
    return {
        "num_requests": len(requests),
        "input_len": {"mean": float(ins.mean()), "p50": float(np.median(ins)), "max": int(ins.max())},
        "output_len": {"mean": float(outs.mean()), "p50": float(np.median(outs)), "max": int(outs.max())},
    }


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds after the start; the first request goes at 0.

    rate inf: all at once. Otherwise gamma(shape=burstiness, scale=1/(rate*burstiness))
    inter-arrival times: mean 1/rate, Poisson at burstiness 1.
    """
    if n <= 0:
        return []
    if rate <= 0:
        raise ValueError(f"request rate must be > 0 (inf for all at once), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def permute_tokens(requests: list[BenchRequest], shape: ModelShape, seed: int) -> list[BenchRequest]:
    """The same requests with every ordinary token id mapped through one seeded permutation.

    Lengths stay, and so do prefixes shared between requests of the list (the shared-prefix
    workload keeps its shape), but nothing is shared with the original list or with another
    seed's permutation: a later run cannot hit the prefix cache with an earlier run's prompts.
    """
    rng = np.random.default_rng(seed)
    table = np.arange(shape.vocab_size)
    table[FIRST_ORDINARY_ID:] = FIRST_ORDINARY_ID + rng.permutation(shape.vocab_size - FIRST_ORDINARY_ID)
    out = []
    for r in requests:
        ids = np.asarray(r.prompt)
        mapped = np.where(ids >= FIRST_ORDINARY_ID, table[np.clip(ids, 0, shape.vocab_size - 1)], ids)
        out.append(BenchRequest(mapped.tolist(), r.output_len))
    return out
