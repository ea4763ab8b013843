"""HF transformers baselines, timed token by token so they yield the same metrics as a server.

Both receive the whole workload at once (every request "sent" when the run starts), greedy,
exactly `output_len` new tokens per request (`min_new_tokens` = `max_new_tokens`, so EOS
cannot end one early):

- hf_one:    `generate` on one request at a time, in order. A later request's TTFT includes
             the time it waited for the earlier ones, as it would behind a one-at-a-time server.
- hf_static: `generate` on static batches of B left-padded requests, in order; a batch runs
             until its longest output is done. A request counts as finished when its own
             last token comes out (generous to the baseline); only its own tokens count.

A streamer stamps the time of every decoding step (HF calls `put` once with the prompt, then
once per step with the new token of every row), which gives TTFT, ITL and E2E per request.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from .metrics import Timeline
from .workloads import BenchRequest

clock = time.perf_counter


def load_hf_model(model: str, dtype: str, device: str):
    from tools.bench.engine import _hf_model

    return _hf_model(SimpleNamespace(model=model, dtype=dtype, device=device))


def _step_clock():
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value) -> None:
            if not self._prompt_seen:  # the first call hands over the prompt
                self._prompt_seen = True
                return
            self.times.append(clock())

        def end(self) -> None:
            pass

    return StepClock()


def generate_batch(model, batch: list[BenchRequest], device: str) -> list[float]:
    """Run one left-padded batch to its longest output; returns the time of each step."""
    import torch

    width = max(len(r.prompt) for r in batch)
    max_new = max(r.output_len for r in batch)
    ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in batch], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=device)
    steps = _step_clock()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
            streamer=steps,
        )
    if out.shape[1] != width + max_new or len(steps.times) != max_new:
        raise RuntimeError(
            f"HF generate made {out.shape[1] - width} tokens in {len(steps.times)} steps, expected {max_new}"
        )
    return steps.times


def _timelines(batch: list[BenchRequest], send: float, step_times: list[float]) -> list[Timeline]:
    out = []
    for r in batch:
        times = step_times[: r.output_len]
        out.append(
            Timeline(
                send=send,
                prompt_tokens=len(r.prompt),
                chunk_times=list(times),
                chunk_tokens=[1] * len(times),
                end=times[-1],
                output_tokens=r.output_len,
            )
        )
    return out


def warm_up(model, requests: list[BenchRequest], device: str) -> None:
    """One short padded batch, so first-call costs do not land on a measured run."""
    prompt = requests[0].prompt
    generate_batch(model, [BenchRequest(prompt[:16], 2), BenchRequest(prompt[:12], 2)], device)


def run_hf_one(
    model, requests: list[BenchRequest], device: str, time_limit_s: float | None = None
) -> tuple[list[Timeline], float]:
    """(timelines, duration) of HF generate one request at a time; none starts after the time limit."""
    start = clock()
    timelines = []
    for r in requests:
        if time_limit_s is not None and clock() - start >= time_limit_s:
            break
        timelines += _timelines([r], start, generate_batch(model, [r], device))
    return timelines, clock() - start


def run_hf_static(
    model, requests: list[BenchRequest], batch_size: int, device: str, time_limit_s: float | None = None
) -> tuple[list[Timeline], float]:
    """(timelines, duration) of HF generate on static batches of `batch_size`, in order; no batch
    starts after the time limit (a batch under way runs to its end)."""
    start = clock()
    timelines = []
    for i in range(0, len(requests), batch_size):
        if time_limit_s is not None and clock() - start >= time_limit_s:
            break
        batch = requests[i : i + batch_size]
        timelines += _timelines(batch, start, generate_batch(model, batch, device))
    return timelines, clock() - start
