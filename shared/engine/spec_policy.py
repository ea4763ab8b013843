"""How many draft tokens to verify this step: a cost model, measured as the engine runs.

Leviathan et al. (2023): with a per-token acceptance rate a, a step that verifies k drafts
yields on average

    E(k) = (1 - a^(k+1)) / (1 - a)          tokens (a = 1: k + 1)

and costs k draft steps plus one target pass. At batch 1 a target pass over k + 1 tokens
costs about what a pass over one does (the weights are read once), so the speedup is
E(k) / (1 + k c), c = draft step / target step. In a large batch that no longer holds: the
target pass grows with its token count, and verifying k + 1 tokens per sequence costs up to
k + 1 plain steps. So the cost of the target pass is modelled as T(n) = t0 + t1 n for n
tokens in the step, and the rate of a step with B decoding sequences and p other (prefill)
tokens is

    rate(k) = B E(k) / (O(B) + D(B k) + T(p + B (k + 1)))      (tokens per second)

with D(m) = d0 + d1 m the draft call proposing m positions in all (D = 0 for k = 0), plus O(B),
what a step costs besides those two, the same for every k: scheduling, and handing the outputs
to the server (which, in a served engine, shares the process and its interpreter). At batch 1
on a small model O is a large share of a plain step, and leaving it out undervalues the
tokens a verification adds per step (E(k) tokens for one O). The
policy picks the k in [1, k_max] with the highest rate, or k = 0 (plain decoding,
rate(0) = B / T(p + B)) unless that rate beats rate(0) by MARGIN (once speculating, it stops
only when rate(0) beats it). Every input is measured while serving: T and D by least-squares lines
through recent (tokens, seconds) samples, exponentially forgotten (a line keeps its last slope
while recent samples have too little spread to fit one); O the same way over B, from the time
between the starts of consecutive steps while the engine stays busy, less their draft call and
target pass; a from the verifications (each
accepted draft is a success, the first rejected one a failure). Until the costs have been
measured the engine speculates with k_max, which is how they get measured; while the model
says 0, an occasional probe step with k_max keeps them current. a is kept engine-wide and per
request (each request's starting from the engine-wide value), and a step's expected tokens are
the sum of its sequences' own E(k): after a stretch of prose the draft guesses badly, and a
request of source code must not inherit that.

Pure: no torch, no clock; the engine feeds it measurements and asks it for k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

ACCEPTANCE_PRIOR = 0.6  # per-token acceptance assumed before any verification
WEIGHT_PRIOR = 4.0  # worth this many observed drafts
# A request's own acceptance starts from the engine-wide one, worth this many drafts: its
# text decides how well the draft guesses (source code vs. free prose), but a single
# verification (often one rejected draft) is too noisy to act on; about two of k = 4 drafts
# outweigh the prior.
REQUEST_WEIGHT_PRIOR = 8.0
DECAY = 0.98  # forgetting per observation: about the last 50 steps count
# Speculation must promise this much more throughput than plain decoding to start (the measured
# costs are noisy, and a gain within the noise is not worth the draft's work); once on, it stops
# when plain decoding promises more at all: each switch has its own cost (the first draft call
# after plain steps computes the tokens they produced), so near break-even it stays as it is.
MARGIN = 0.05
# While the model says k = 0, every PROBE_EVERY x B steps (B decoding sequences) is verified
# with k_max anyway: acceptance and the draft's cost are only measured while speculating, and
# both change (another text, another batch size). A probe costs about k_max + 1 plain steps,
# so a few percent of the time in a large batch, where probes are rarer.
PROBE_EVERY = 8


def expected_tokens(a: float, k: int) -> float:
    """E(k): tokens a step verifying k drafts yields on average, per-token acceptance a."""
    if k <= 0:
        return 1.0
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def leviathan_speedup(a: float, k: int, c: float) -> float:
    """Leviathan et al.'s speedup of speculation over plain decoding at batch 1: E(k) / (1 + k c)."""
    return expected_tokens(a, k) / (1.0 + k * c)


def best_k(a: float | Iterable[float], k_max: int, draft_s, target_s, num_seqs: int, other_tokens: int = 0,
           overhead_s: float = 0.0, margin: float = MARGIN) -> int:
    """The k in [0, k_max] with the most tokens per second (see the module docstring).
    `a`: one acceptance rate for every sequence, or one per sequence; `target_s(n)`: seconds of
    a target pass over n tokens; `draft_s(m)`: of a draft call proposing m positions in all;
    `overhead_s`: the rest of a step, whatever k; `margin`: the share by which the best k's
    rate must beat plain decoding's."""
    rates = [a] * num_seqs if isinstance(a, (int, float)) else list(a)

    def rate(k: int) -> float:
        seconds = overhead_s + (draft_s(num_seqs * k) if k else 0.0) + target_s(other_tokens + num_seqs * (k + 1))
        return sum(expected_tokens(r, k) for r in rates) / max(seconds, 1e-9)

    if k_max <= 0:
        return 0
    best = max(range(1, k_max + 1), key=lambda k: (rate(k), -k))
    return best if rate(best) > rate(0) * (1.0 + margin) else 0


class StepCostFit:
    """T(n) = t0 + t1 n by least squares over (tokens, seconds) samples, older ones forgotten."""

    def __init__(self, decay: float = DECAY):
        self.decay = decay
        self._w = self._n = self._t = self._nn = self._nt = 0.0
        self._slope = 0.0  # the last slope fitted

    def add(self, num_tokens: int, seconds: float) -> None:
        d = self.decay
        n = float(num_tokens)
        self._w = self._w * d + 1.0
        self._n = self._n * d + n
        self._t = self._t * d + seconds
        self._nn = self._nn * d + n * n
        self._nt = self._nt * d + n * seconds

    @property
    def measured(self) -> bool:
        return self._w > 0

    def coefficients(self) -> tuple[float, float]:
        """(t0, t1). With too little spread in recent n, the last fitted slope is kept (0 before
        any), through the mean of recent samples."""
        if self._w <= 0:
            return 0.0, 0.0
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var = self._nn / self._w - mean_n * mean_n
        if var > max(0.25, 0.01 * mean_n * mean_n):
            self._slope = max(0.0, (self._nt / self._w - mean_n * mean_t) / var)
        return max(0.0, mean_t - self._slope * mean_n), self._slope

    def __call__(self, num_tokens: int) -> float:
        t0, t1 = self.coefficients()
        return t0 + t1 * num_tokens


@dataclass
class Ewma:
    """An exponentially weighted mean that starts from a prior worth `weight` observations."""

    value: float
    weight: float
    decay: float = DECAY

    def add(self, value: float, weight: float = 1.0) -> None:
        keep = self.weight * self.decay
        self.weight = keep + weight
        self.value = (self.value * keep + value * weight) / self.weight


class SpecPolicy:
    """Per-step k for speculative decoding, from measured costs and acceptance.

    The engine calls `observe_step` after each forward pass, `observe_draft` after each draft
    call, `observe_verify` after each verification, `observe_overhead` once the next step of a
    busy engine begins, and `choose_k` before proposing.
    `adaptive=False`: always k_max (the configured k); measurements are still kept."""

    def __init__(self, adaptive: bool = True):
        self.adaptive = adaptive
        self.target = StepCostFit()  # seconds of a forward pass over n tokens
        self.draft = StepCostFit()  # seconds of a draft call proposing m positions in all
        self.overhead = StepCostFit()  # seconds of the rest of a step with B decoding sequences
        self.acceptance = Ewma(ACCEPTANCE_PRIOR, WEIGHT_PRIOR)
        self.last_k: int | None = None
        self._plain_steps = 0  # steps at k = 0 since the last speculating one
        self._on = True  # the model's last choice was to speculate (probes aside)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0 and math.isfinite(seconds):
            self.target.add(num_tokens, seconds)

    def observe_draft(self, num_positions: int, seconds: float) -> None:
        """One draft call asked for `num_positions` in all (k per sequence, summed)."""
        if num_positions > 0 and seconds >= 0 and math.isfinite(seconds):
            self.draft.add(num_positions, seconds)

    def observe_overhead(self, num_seqs: int, seconds: float) -> None:
        """A busy engine's step cycle (start to next start) less its draft call and target pass."""
        if num_seqs > 0 and seconds >= 0 and math.isfinite(seconds):
            self.overhead.add(num_seqs, seconds)

    def request_acceptance(self) -> Ewma:
        """A new request's own acceptance estimate: starts from the engine-wide one and averages
        all the request's verifications, none forgotten. A shorter memory chases stretches of
        worse-guessed text, and once it says k = 0 only the rare probes can correct it: the
        estimate stayed low after the text got easy again (slower than plain decoding at c1)."""
        return Ewma(self.acceptance.value, REQUEST_WEIGHT_PRIOR, decay=1.0)

    def planning_acceptance(self, request: Ewma | None) -> float:
        """The acceptance a request's k is chosen with: its estimate (None: none yet, the
        engine-wide value worth REQUEST_WEIGHT_PRIOR drafts) plus one standard error. While a
        request has few verifications of its own its estimate is mostly the prior, and at k = 0 it
        would gather more only from the rare probes: the bonus has it speculate until its own
        drafts tell (optimism in the face of uncertainty), and shrinks as they accumulate."""
        value, weight = (request.value, request.weight) if request else (self.acceptance.value, REQUEST_WEIGHT_PRIOR)
        a = min(max(value, 0.0), 1.0)
        return min(1.0, a + math.sqrt(a * (1.0 - a) / max(weight, 1.0)))

    def observe_verify(self, proposed: int, accepted: int, request: Ewma | None = None) -> None:
        """m of k drafts accepted: m successes, and one failure when m < k; counted engine-wide
        and in the request's own estimate (`request_acceptance`)."""
        trials = accepted + (1 if accepted < proposed else 0)
        if trials:
            self.acceptance.add(accepted / trials, trials)
            if request is not None:
                request.add(accepted / trials, trials)

    def choose_k(self, k_max: int, num_seqs: int, other_tokens: int = 0,
                 acceptances: Iterable[float] | None = None) -> int:
        """k for this step's `num_seqs` decoding sequences, `other_tokens` (prefill) beside them;
        `acceptances`: each sequence's own estimate (default: the engine-wide one for all), read
        only when the cost model runs (not while measuring, nor with a fixed k)."""
        if not self.adaptive or k_max <= 0 or num_seqs <= 0:
            k = max(0, k_max)
        elif not (self.draft.measured and self.target.measured):
            k = k_max  # speculate to measure
        else:
            overhead = self.overhead(num_seqs) if self.overhead.measured else 0.0
            a = self.acceptance.value if acceptances is None else acceptances
            margin = 0.0 if self._on else MARGIN  # hysteresis: see MARGIN
            k = best_k(a, k_max, self.draft, self.target, num_seqs, other_tokens, overhead, margin)
            self._on = k > 0
            if k == 0:
                self._plain_steps += 1
                if self._plain_steps >= PROBE_EVERY * num_seqs:
                    k = k_max  # a probe
        if k:
            self._plain_steps = 0
        self.last_k = k
        return k
