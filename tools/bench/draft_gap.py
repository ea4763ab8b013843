"""`python -m tools.bench draft-gap`: what a draft call costs right after other work.

    python -m tools.bench draft-gap --model models/tandem-demo-code/target

The draft service answers one call per decode step; between two calls the target verifies
(several ms), and the draft process sits idle. This times the draft's k-token proposal call
(services/common/draft_calls.propose, the draft service's handler without gRPC) in this one
process and thread, with nothing else of Tandem running, after each of these gaps:

    none        back to back (how the bench's step costs, and so c, are measured)
    spin        8 ms of a Python busy loop
    matmul      8 ms of float32 matrix-vector products over ~19 MB (a target forward's reads)
    sleep       8 ms asleep
    draft       8 ms of the same draft call on another sequence (the same code and weights)
    warm        8 ms of spin, then a one-token draft call on another sequence just before

The gap kinds take turns, round by round, so that the host's drift lands on all; medians.
Each of the call's model forwards is timed too (the first computes the sequence's new tokens,
each next one a proposal), to show where in the call a gap's cost falls. One torch thread, as
the services run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GAPS = ("none", "spin", "matmul", "sleep", "draft", "warm")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "draft-gap",
        help="the draft's proposal call back to back and after 8 ms of other work, in one process",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="models/tandem-demo-code/target", help="the target; its draft is beside it"
    )
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--gap-ms", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=100, help="timed calls per gap kind and round")
    p.add_argument("--out-dir", default="bench-results/draft-gap")
    p.set_defaults(func=run)


class _Sequence:
    """One draft sequence fed from a token stream: each call adds two tokens (one accepted draft
    and the target's own, a typical verification) and asks for k proposals."""

    def __init__(self, engine, name: str, tokens: list[int], k: int):
        self.engine, self.name, self.tokens, self.k = engine, name, tokens, k
        self.start = 0
        self.restart()

    def _call(self, kept: int, new: list[int], k: int) -> None:
        from services.common import draft_calls
        from shared.pb.tandem.v1 import draft_pb2

        s = draft_pb2.DraftSequence(
            sequence_id=self.name, num_kept_tokens=kept, token_ids=new, num_proposals=k
        )
        draft_calls.propose(self.engine, draft_pb2.ProposeRequest(client_id="bench", sequences=[s]))

    def restart(self) -> None:
        self.start = (self.start + 97) % max(1, len(self.tokens) - 600)
        self.length = 128
        self._call(0, self.tokens[self.start : self.start + self.length], self.k)

    def step(self, k: int | None = None) -> None:
        if self.length + 2 > 512:
            self.restart()
        kept = self.length
        self.length += 2
        self._call(kept, self.tokens[self.start + kept : self.start + self.length], k or self.k)


def run(args) -> int:
    import torch

    from services.draft.app import build_engine
    from shared.config import DraftConfig
    from shared.text import Tokenizer

    from .topology import draft_model_dir

    torch.set_num_threads(1)
    draft_dir = draft_model_dir(args.model)
    if not (draft_dir / "config.json").is_file():
        print(f"no draft model beside {args.model} ({draft_dir})")
        return 1
    engine = build_engine(DraftConfig(model=str(draft_dir), torch_threads=1))
    # token ids of real source text (this repository's engine), as a code model's sequences
    source = "".join(p.read_text() for p in sorted((ROOT / "shared" / "engine").glob("*.py")))
    tokens = Tokenizer.from_dir(draft_dir).encode(source)
    timed = _Sequence(engine, "timed", tokens, args.k)
    other = _Sequence(engine, "other", tokens[len(tokens) // 2 :], args.k)
    gap_s = args.gap_ms / 1e3
    vector, matrix = torch.randn(1, 768), torch.randn(768, 768 * 8)

    def gap(kind: str) -> None:
        t = time.perf_counter()
        if kind == "sleep":
            time.sleep(gap_s)
            return
        while time.perf_counter() - t < gap_s:
            if kind == "matmul":
                vector @ matrix
            elif kind == "draft":
                other.step()
        if kind == "warm":
            other.step(k=1)

    # each forward of the timed call (not the gap's own draft calls)
    forward, forwards, recording = engine.runner.forward, [], [False]

    def timed_forward(*a, **kw):
        t = time.perf_counter()
        out = forward(*a, **kw)
        if recording[0]:
            forwards.append(time.perf_counter() - t)
        return out

    engine.runner.forward = timed_forward
    medians: dict[str, list[float]] = {kind: [] for kind in GAPS}
    forward_medians: dict[str, list[list[float]]] = {kind: [] for kind in GAPS}  # per round, per forward
    for _ in range(args.rounds):
        for kind in GAPS:
            times, per_forward = [], [[] for _ in range(args.k)]
            for _ in range(args.calls):
                if timed.length + 2 > 512:  # the sequence starts over outside the timed call
                    timed.restart()
                if kind != "none":
                    gap(kind)
                forwards.clear()
                recording[0] = True
                t = time.perf_counter()
                timed.step()
                times.append(time.perf_counter() - t)
                recording[0] = False
                for i, sec in enumerate(forwards[: args.k]):
                    per_forward[i].append(sec)
            medians[kind].append(statistics.median(times) * 1e3)
            forward_medians[kind].append([statistics.median(f) * 1e3 for f in per_forward if f])
    result = {
        "command": "python -m tools.bench draft-gap "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("func", "command", "out_dir")
        ),
        "k": args.k,
        "gap_ms": args.gap_ms,
        "call_ms": {kind: statistics.median(v) for kind, v in medians.items()},
        "call_ms_by_round": medians,
        # the median over the rounds of each forward's median: [first forward, second, ...]
        "forward_ms": {
            kind: [statistics.median(r[i] for r in rounds) for i in range(min(len(r) for r in rounds))]
            for kind, rounds in forward_medians.items()
        },
    }
    base = result["call_ms"]["none"]
    lines = [
        f"Draft call proposing k = {args.k}, after {args.gap_ms:g} ms of: (median of {args.rounds} rounds)",
        "",
        "| gap | call ms | / back to back | its forwards, ms (first, second, ...) |",
        "|---|---|---|---|",
    ]
    for kind in GAPS:
        ms = result["call_ms"][kind]
        each = ", ".join(f"{f:.2f}" for f in result["forward_ms"][kind])
        lines.append(f"| {kind} | {ms:.2f} | {ms / base:.2f}x | {each} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft-gap.json").write_text(json.dumps(result, indent=2))
    (out / "draft-gap.md").write_text(text)
    print(text)
    return 0
