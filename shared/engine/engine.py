"""The engine: add_request / step / abort, plus KV export and import for disaggregation.

One step = schedule (policy) -> run (model forward on the batch) -> sample -> update
requests. Not thread-safe: one thread drives it (see AsyncEngine). Knows nothing about
gRPC or text: prompts and outputs are token ids.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from shared.config import auto_dtype
from shared.guidance import Guide, allowed_tokens
from shared.params import (
    MAX_SPECULATIVE_TOKENS,
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    check_length,
    check_prompt,
)

from .kv_manager import KVCacheManager
from .model import ModelConfig, cpu_kernels
from .request import Request, Status
from .runner import ModelRunner, SeqInput
from .sampler import SamplingRow, row_generator, rows_logprobs, sample, target_distribution
from .scheduler import Scheduler
from .spec import Proposal, ProposalRequest, Proposer, verify
from .spec_policy import SpecPolicy

log = logging.getLogger(__name__)


class KVCacheTooSmall(ValueError):
    """The KV cache cannot hold one sequence of the configured max_model_len."""


@dataclass
class EngineConfig:
    model: str  # Hugging Face checkpoint directory
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (bfloat16 on cuda, float32 on cpu)
    quantization: str = "none"  # none | int8 (weight-only, per output channel, quantized at load)
    kv_cache_dtype: str = "auto"  # auto (= dtype) | fp8 | int8 (packed 8-bit rows with scales)
    device: str = "cpu"  # cpu | cuda | cuda:N
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory, or on cuda from the free memory
    kv_cache_memory: int | None = None  # bytes of KV cache when num_blocks is None (cpu default: 1 GiB)
    kv_cache_memory_fraction: float = 0.85  # cuda, neither set: share of the memory free after the weights
    cuda_graphs: bool = True  # cuda: decode steps replay CUDA graphs captured per batch-size bucket
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0  # for requests without their own seed
    num_speculative_tokens: int = 4  # draft tokens per step when a proposer is set (per request override)
    adaptive_speculation: bool = True  # k per step from measured costs and acceptance (spec_policy.py), <= the above

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be >= 1 byte, got {self.kv_cache_memory}")


def kv_cache_budget(config: EngineConfig, device: torch.device,
                    mem_get_info=torch.cuda.mem_get_info) -> int:
    """Bytes for the KV cache: kv_cache_memory when set; else on cuda the given fraction of the
    memory free now (the weights are loaded, so it is what they left), on cpu 1 GiB."""
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _total = mem_get_info(device)
        return int(free * config.kv_cache_memory_fraction)
    return 1 << 30


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    num_preemptions: int
    # decode steps that could speculate, by the drafts per sequence the policy chose (index k; 0: plain)
    spec_steps_by_k: tuple[int, ...] = ()


class LLMEngine:
    def __init__(self, config: EngineConfig):
        config.validate()
        if config.dtype == "auto":
            config.dtype = auto_dtype(config.device)
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.runner = ModelRunner(config.model, self.model_config, config.dtype, config.device,
                                  quantization=config.quantization, kv_cache_dtype=config.kv_cache_dtype)
        if self.runner.device.type == "cpu":
            cpu_kernels.load()  # build (or load the cached) decode kernel now, not on the first request
        self.block_size = config.block_size
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        num_blocks = config.num_blocks or self._auto_num_blocks()
        self._fit_model_len(num_blocks)
        self.runner.allocate_kv_cache(num_blocks, config.block_size)
        if self.runner.device.type == "cuda" and config.cuda_graphs:
            self.runner.enable_decode_graphs(config.max_num_seqs, self.max_model_len)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._arrival = itertools.count()
        self._generator = torch.Generator().manual_seed(config.seed)
        self.proposer: Proposer | None = None
        self.spec_policy = SpecPolicy(adaptive=config.adaptive_speculation)
        self._spec_steps_by_k = [0] * (MAX_SPECULATIVE_TOKENS + 1)
        self._last_cycle: tuple[float, float, int] | None = None  # (start, draft + forward s, decodes)
        self._plan: _ProposalPlan | None = None  # the next step's draft asks, when prefetched
        self.guide = Guide(config.model, self.model_config.vocab_size, self.model_config.eos_token_ids)
        self.guide.warm()

    def _auto_num_blocks(self) -> int:
        per_block = self.runner.kv_bytes_per_block(self.config.block_size)
        budget = kv_cache_budget(self.config, self.runner.device)
        # enough for max_num_seqs full-length sequences at most (_fit_model_len: at least one)
        cap = -(-self.max_model_len // self.block_size) * self.config.max_num_seqs
        return int(max(0, min(budget // per_block, cap)))

    def _fit_model_len(self, num_blocks: int) -> None:
        """The KV cache must hold one sequence of max_model_len tokens. Unless max_model_len was
        set, it defaults to what the cache holds (a 128K-position model on a CPU's 1 GiB cache);
        when it was set, a cache too small for it is a KVCacheTooSmall error naming both settings."""
        holds = num_blocks * self.block_size
        if holds >= self.max_model_len:
            return
        mib = self.runner.kv_bytes_per_block(self.block_size) * num_blocks / 2**20
        amount = f"{mib:.0f} MiB" if mib >= 1 else f"{mib * 1024:.0f} KiB"  # never "0 MiB"
        size = f"{num_blocks} blocks of {self.block_size} tokens ({amount})"
        if self.config.max_model_len is not None or holds < self.block_size:
            raise KVCacheTooSmall(
                f"a KV cache of {size} cannot hold one {self.max_model_len}-token sequence: "
                "lower TANDEM_MAX_MODEL_LEN or raise TANDEM_KV_CACHE_MEMORY (or TANDEM_NUM_BLOCKS)")
        log.info("max_model_len defaults to %d tokens, what a KV cache of %s holds for one sequence "
                 "(the model allows %d); set TANDEM_MAX_MODEL_LEN / TANDEM_KV_CACHE_MEMORY to choose",
                 holds, size, self.max_model_len)
        self.max_model_len = holds

    # -- requests ---------------------------------------------------------------------
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The rules of shared.params (the scheduler applies the same ones), then the KV capacity."""
        check_prompt(prompt_token_ids, self.model_config.vocab_size, self.max_model_len)
        params.validate(self.model_config.vocab_size)
        check_length(len(prompt_token_ids), params.max_tokens, self.max_model_len)
        total = len(prompt_token_ids) + params.max_tokens
        if self.kv.pool.num_blocks * self.block_size < total:
            raise InvalidRequest("max_tokens", f"{total} tokens exceed the whole KV cache "
                                 f"({self.kv.pool.num_blocks * self.block_size} tokens)")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    hold_kv: bool = False, matcher=None) -> None:
        """`matcher`: the request's structured-output matcher, made beforehand with `matcher_for`
        (AsyncEngine compiles it off the engine's thread); None: made here when it has guidance."""
        if request_id in self.requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        self.validate_request(prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, next(self._arrival), hold_kv=hold_kv,
                      arrival_time=time.monotonic())
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = []
        req.matcher = matcher if matcher is not None else self.matcher_for(prompt_token_ids, params)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def matcher_for(self, prompt_token_ids: list[int], params: SamplingParams, first: list[int] = ()):
        """The structured-output matcher of a request (None without guidance), advanced past its
        generated tokens: a resumed request's earlier outputs (the last seed_offset of its prompt),
        then `first` (a token sampled by the prefill worker). Safe to call from any thread."""
        if params.guidance is None:
            return None
        earlier = prompt_token_ids[max(0, len(prompt_token_ids) - params.seed_offset) :] if params.seed_offset else []
        return self.guide.matcher(params.guidance, [*earlier, *first])

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if self.proposer is not None:
            self.proposer.release(request_id)
        self.scheduler.remove(req)
        self.kv.free(request_id)
        req.status = Status.FINISHED

    def release(self, request_id: str) -> None:
        """Free a held request's blocks (full ones stay in the prefix cache)."""
        self.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            num_free_blocks=self.kv.num_free_blocks, num_total_blocks=self.kv.pool.num_blocks,
            num_cached_blocks=self.kv.pool.num_cached, prefix_cache_hit_tokens=self.kv.hit_tokens,
            prefix_cache_query_tokens=self.kv.query_tokens, num_preemptions=self.scheduler.num_preemptions,
            spec_steps_by_k=tuple(self._spec_steps_by_k),
        )

    # -- the step ---------------------------------------------------------------------
    def set_proposer(self, proposer: Proposer | None) -> None:
        """Speculate with this proposer (None: plain decoding)."""
        if self.proposer is not None and proposer is not self.proposer:
            for rid in self.requests:
                self.proposer.release(rid)
        self.proposer = proposer

    def step(self) -> list[RequestOutput]:
        begin = time.perf_counter()
        if self._last_cycle is not None:  # the previous step's overhead: start to start, less what it measured
            prev_begin, measured, num_decodes = self._last_cycle
            self.spec_policy.observe_overhead(num_decodes, begin - prev_begin - measured)
        self._last_cycle = None
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        num_prefill_tokens = sum(n for _, n in batch.prefills)
        proposing = time.perf_counter()
        spec = self._propose(batch.decodes, num_prefill_tokens)
        started = time.perf_counter()
        # a prefill chunk wants its last row's logits when it ends the prompt (the first token), and
        # every row's while the request collects prompt logprobs
        prefills = [(r, n, n if r.collects_prompt_logprobs else int(r.num_computed_tokens + n == r.num_tokens))
                    for r, n in batch.prefills]
        verifies = [(r, 1 + len(spec[r.request_id].token_ids), 1 + len(spec[r.request_id].token_ids))
                    for r in batch.decodes if r.request_id in spec]
        # by context length, so that the runner can batch decodes of similar length
        decodes = sorted((r for r in batch.decodes if r.request_id not in spec), key=lambda r: r.num_tokens)
        seqs = prefills + verifies
        logits = self.runner.forward(
            [self._seq_input(r, n, spec) for r, n, _ in seqs],
            [self._seq_input(r, 1, spec) for r in decodes],
            [want for _, _, want in seqs] + [1] * len(decodes),
        )
        outputs: list[RequestOutput] = []
        sample_reqs: list[Request] = []
        sample_logits: list[torch.Tensor] = []
        offset = 0
        for r, n, want in seqs:
            block = logits[offset: offset + want]
            offset += want
            if r.request_id in spec and want > 1:
                outputs.append(self._verify(r, spec[r.request_id], block))
                continue
            if r.collects_prompt_logprobs:
                self._collect_prompt_logprobs(r, block)
            r.num_computed_tokens += n
            self.kv.cache_full_blocks(r)
            if r.num_computed_tokens == r.num_tokens:  # the prompt's last row samples the first token
                sample_reqs.append(r)
                sample_logits.append(block[-1:])
        for r in decodes:
            r.num_computed_tokens += 1
            self.kv.cache_full_blocks(r)
            sample_reqs.append(r)
            sample_logits.append(logits[offset: offset + 1])
            offset += 1
        if sample_reqs:
            vocab = self.model_config.vocab_size
            rows = [SamplingRow(r.params, r.all_token_ids, r.num_output_tokens + r.params.seed_offset,
                                allowed_tokens(r.matcher, vocab) if r.matcher is not None else None)
                    for r in sample_reqs]
            tokens, logprobs = sample(torch.cat(sample_logits), rows, self._generator)
            for r, token, lp in zip(sample_reqs, tokens, logprobs, strict=True):
                outputs.append(self._append_tokens(r, [token], [lp] if lp is not None else None))
        num_tokens = num_prefill_tokens + len(decodes) + sum(n for _, n, _ in verifies)
        forward_s = time.perf_counter() - started
        self.spec_policy.observe_step(num_tokens, forward_s)
        if batch.decodes and self.has_unfinished():  # busy: the next step follows at once
            self._last_cycle = (begin, started - proposing + forward_s, len(batch.decodes))
        self._prefetch_proposals()
        return outputs

    def _collect_prompt_logprobs(self, req: Request, rows: torch.Tensor) -> None:
        """rows: the logits of every token of a prefill chunk (before num_computed_tokens moves):
        row i predicts the token after position num_computed_tokens + i. Positions already
        collected (a chunk computed again after a preemption) are skipped."""
        prompt, lps = req.prompt_token_ids, req.prompt_logprobs
        start = req.num_computed_tokens
        # lps holds positions 1..len(lps), so the next one to collect is predicted by row len(lps) - start;
        # the prompt's last row predicts the first output, not a prompt token
        first, stop = len(lps) - start, min(rows.shape[0], len(prompt) - 1 - start)
        if first >= stop:
            return
        raw = torch.log_softmax(rows[first:stop].float(), dim=-1)
        lps.extend(rows_logprobs(raw, prompt[start + first + 1 : start + stop + 1], req.params.prompt_logprobs))

    def _seq_input(self, req: Request, n: int, spec: dict[str, Proposal]) -> SeqInput:
        tokens = req.all_token_ids
        if req.request_id in spec:
            tokens = tokens + spec[req.request_id].token_ids
        return SeqInput(tokens, req.num_computed_tokens, n, self.kv.block_ids(req.request_id))

    def _spec_k(self, req: Request) -> int:
        if req.matcher is not None:  # structured output: every token is sampled under its mask
            return 0
        k = req.params.num_speculative_tokens
        k = self.config.num_speculative_tokens if k is None else k
        # every step adds up to k + 1 tokens: stay within max_tokens and the model length
        remaining = min(req.params.max_tokens - req.num_output_tokens - req.num_external_outputs,
                        self.max_model_len - req.num_tokens)
        return max(0, min(k, remaining - 1))

    def _plan_proposals(self, decodes: list[Request], num_prefill_tokens: int) -> _ProposalPlan | None:
        """The draft asks of a step with these decodes beside `num_prefill_tokens` prefill tokens
        (None: none of them can speculate)."""
        caps = [(r, k) for r in decodes if (k := self._spec_k(r)) > 0]
        if not caps:
            return None
        # this step's k from measured costs and acceptance (0: plain decoding this step)
        k_step = self.spec_policy.choose_k(
            max(k for _, k in caps), len(caps), num_prefill_tokens + len(decodes) - len(caps),
            (self.spec_policy.planning_acceptance(r.spec_acceptance) for r, _ in caps))  # read only if the model runs
        # A seeded sampled request keeps its k: its draws depend on where steps begin, and its
        # output must not depend on timing. Greedy outputs do not depend on k at all.
        asks = [ProposalRequest(r.request_id, r.all_token_ids, k if _k_fixed(r) else min(k, k_step), r.params, k)
                for r, k in caps]
        return _ProposalPlan(_batch_key(decodes, num_prefill_tokens), k_step, [a for a in asks if a.num_tokens > 0])

    def _prefetch_proposals(self) -> None:
        """At the end of a step: when the next one will decode exactly the running requests (no
        prompt waits, none is mid-prefill), plan its asks now and have the proposer send them at
        once (`prefetch`), so that a remote draft computes while this step's outputs go out."""
        prefetch = getattr(self.proposer, "prefetch", None)
        running = self.scheduler.running
        if prefetch is None or not running or self.scheduler.waiting:
            return
        decodes = sorted(running, key=lambda r: r.arrival)  # the scheduler's order for decodes
        if any(r.status is not Status.RUNNING or r.num_tokens - r.num_computed_tokens != 1 for r in decodes):
            return
        self._plan = self._plan_proposals(decodes, 0)
        if self._plan is not None and self._plan.asks:
            prefetch(self._plan.asks)

    def _propose(self, decodes: list[Request], num_prefill_tokens: int) -> dict[str, Proposal]:
        plan, self._plan = self._plan, None
        if self.proposer is None or not decodes:
            return {}
        if plan is None or plan.key != _batch_key(decodes, num_prefill_tokens):
            plan = self._plan_proposals(decodes, num_prefill_tokens)  # not the batch prefetched for
            if plan is None:
                return {}
        self._spec_steps_by_k[plan.k_step] += 1
        asks = plan.asks
        if not asks:
            return {}
        asked = [self.requests[a.request_id] for a in asks]
        # a request's first call also has the draft compute its whole prompt: a one-time cost
        # that says nothing of a speculating step's (measured anyway while nothing else is)
        catching_up = any(not r.draft_asked for r in asked)
        started = time.perf_counter()
        proposals = self.proposer.propose(asks)
        draft_s = time.perf_counter() - started
        for r in asked:
            r.draft_asked = True
        # an empty answer (the draft skipped or gone) says nothing of its cost
        if proposals and (not catching_up or not self.spec_policy.draft.measured):
            self.spec_policy.observe_draft(sum(a.num_tokens for a in asks), draft_s)
        accepted: dict[str, Proposal] = {}
        for ask, r in zip(asks, asked, strict=True):
            prop = proposals.get(ask.request_id)
            if prop is None or not prop.token_ids:
                continue
            if len(prop.token_ids) > ask.num_tokens:
                prop = Proposal(prop.token_ids[: ask.num_tokens],
                                None if prop.probs is None else prop.probs[: ask.num_tokens])
            # the scheduler reserved a slot for one token; verification needs len(draft) more
            if self.kv.allocate_slots(r, 1 + len(prop.token_ids)):
                accepted[r.request_id] = prop
        return accepted

    def _verify(self, req: Request, prop: Proposal, logits: torch.Tensor) -> RequestOutput:
        """logits: [k + 1, V] at the last known token and each draft token."""
        drafts = prop.token_ids
        base = req.all_token_ids
        first = req.num_output_tokens + req.params.seed_offset  # output index of drafts[0]
        rows = [SamplingRow(req.params, base + drafts[:i], first + i) for i in range(len(drafts) + 1)]
        target = target_distribution(logits, rows)
        seed = req.params.seed
        gen = self._generator if seed is None else row_generator(seed, first)
        tokens, accepted = verify(target, drafts, prop.probs, req.params.greedy, gen)
        req.num_spec_proposed += len(drafts)
        req.num_spec_accepted += accepted
        req.num_spec_steps += 1
        if req.spec_acceptance is None:
            req.spec_acceptance = self.spec_policy.request_acceptance()
        self.spec_policy.observe_verify(len(drafts), accepted, req.spec_acceptance)
        # KV is valid for the last known token and the accepted drafts; rejected positions leave
        req.num_computed_tokens = req.num_tokens + accepted
        self.kv.truncate(req, req.num_computed_tokens)
        lps = None
        if req.params.logprobs:
            raw = torch.log_softmax(logits, dim=-1)
            lps = rows_logprobs(raw[: len(tokens)], tokens, req.params.logprobs)
        out = self._append_tokens(req, tokens, lps)
        if not out.finished:
            self.kv.cache_full_blocks(req)
        return out

    def _append_tokens(self, req: Request, tokens: list[int], lps: list[TokenLogprobs] | None) -> RequestOutput:
        reason = None
        emitted = []
        for token in tokens:
            req.output_token_ids.append(token)
            emitted.append(token)
            if req.matcher is not None and not req.matcher.consume_token(token):
                # the mask allowed it, so only a fault in the matcher gets here
                log.error("request %s: structured output refused token %d: %s", req.request_id, token,
                          req.matcher.get_error())
                reason = FinishReason.ERROR
                break
            reason = self._check_stop(req, token)
            if reason is not None:
                break
        if reason is not None:
            req.finish_reason = reason
            self._finish(req)
        return RequestOutput(
            request_id=req.request_id, new_token_ids=emitted, finished=reason is not None,
            finish_reason=reason, logprobs=lps[: len(emitted)] if lps is not None else None,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=max(req.num_cached_tokens, 0),
            num_output_tokens=req.num_output_tokens + req.num_external_outputs,
            num_spec_proposed=req.num_spec_proposed, num_spec_accepted=req.num_spec_accepted,
            num_spec_steps=req.num_spec_steps, queue_seconds=req.queue_seconds,
            prompt_logprobs=self._take_prompt_logprobs(req),
        )

    @staticmethod
    def _take_prompt_logprobs(req: Request) -> list[TokenLogprobs] | None:
        """The prompt logprobs, once: the first output comes after the whole prompt was computed."""
        lps, req.prompt_logprobs = req.prompt_logprobs, None
        return lps

    def _check_stop(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if not p.ignore_eos and token in self.model_config.eos_token_ids:
            return FinishReason.STOP
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if req.matcher is not None and req.matcher.is_stopped():  # the structured output is complete
            return FinishReason.STOP
        if req.num_output_tokens + req.num_external_outputs >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request) -> None:
        self.scheduler.remove(req)
        if self.proposer is not None:
            self.proposer.release(req.request_id)
        if req.hold_kv:
            req.status = Status.HELD  # blocks stay until export_kv + release
        else:
            self.requests.pop(req.request_id, None)
            self.kv.free(req.request_id)
            req.status = Status.FINISHED

    # -- KV export / import (disaggregation) ------------------------------------------
    @property
    def kv_cache_dtype(self) -> str:
        """What export_kv returns and import_kv takes: the model dtype's name, or "fp8" / "int8"."""
        return self.runner.kv_cache_dtype

    @property
    def kv_head_width(self) -> int:
        """Last dim of an exported payload: head_dim, or head_dim + head_dim / 32 for 8-bit KV."""
        return self.runner.kv_head_width

    def export_kv(self, request_id: str) -> torch.Tensor:
        """The prompt's KV of a held request: [num_layers, 2, num_prompt_tokens, Hkv, kv_head_width]
        in the cache's dtype (8-bit caches: their packed bytes and scales, as stored)."""
        req = self._get(request_id, Status.HELD)
        return self.runner.gather_kv(self.kv.block_ids(request_id), req.num_prompt_tokens)

    def reserve(self, request_id: str, num_tokens: int) -> bool:
        """Reserve blocks for `num_tokens` of KV that another engine will send."""
        if request_id in self.requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        req = Request(request_id, [], SamplingParams(), next(self._arrival), status=Status.RESERVED)
        if not self.kv.allocate_slots(req, num_tokens):
            return False
        self.requests[request_id] = req
        return True

    def import_kv(self, request_id: str, kv: torch.Tensor, layer_start: int = 0, token_start: int = 0) -> None:
        self._get(request_id, Status.RESERVED)
        block_ids = self.kv.block_ids(request_id)
        if token_start + kv.shape[2] > len(block_ids) * self.block_size:
            raise ValueError(f"KV tokens [{token_start}, {token_start + kv.shape[2]}) exceed the reservation")
        self.runner.scatter_kv(block_ids, kv, layer_start, token_start)

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                      params: SamplingParams, first_logprobs: TokenLogprobs | None = None, *,
                      matcher=None) -> RequestOutput | None:
        """Start decoding a request whose prompt KV was imported; returns a finished output if
        the first token already ends it (then the reservation is freed)."""
        req = self._get(request_id, Status.RESERVED)
        self.validate_request(prompt_token_ids, params)
        if params.prompt_logprobs is not None:
            raise InvalidRequest("prompt_logprobs", "need the prompt prefilled on this engine, not imported")
        reserved = len(self.kv.tables.get(request_id, [])) * self.block_size
        if reserved < len(prompt_token_ids):
            raise ValueError(f"reserved {reserved} tokens of KV, prompt has {len(prompt_token_ids)}")
        if matcher is None:
            matcher = self.matcher_for(prompt_token_ids, params, [first_token_id])
        req.prompt_token_ids = list(prompt_token_ids)
        req.params = params
        req.matcher = matcher
        req.num_computed_tokens = len(prompt_token_ids)
        req.num_cached_tokens = 0
        self.kv.cache_full_blocks(req)
        # the first token was sampled by the prefill worker
        req.output_token_ids = [first_token_id]
        reason = self._check_stop(req, first_token_id)
        if reason is not None:
            req.finish_reason = reason
            self.requests.pop(request_id, None)
            self.kv.free(request_id)
            return RequestOutput(request_id, [], finished=True, finish_reason=reason,
                                 num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=1)
        self.scheduler.add_running(req)
        return None

    def _get(self, request_id: str, status: Status) -> Request:
        req = self.requests.get(request_id)
        if req is None or req.status is not status:
            have = "unknown" if req is None else req.status.value
            raise KeyError(f"request {request_id!r} is {have}, expected {status.value}")
        return req

    # -- convenience ------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion; returns the output token ids of each, in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{next(self._arrival)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in ids]


def _k_fixed(req: Request) -> bool:
    return req.params.seed is not None and not req.params.greedy


@dataclass
class _ProposalPlan:
    """One step's draft asks and the k the policy chose for them."""

    key: tuple  # the batch they were planned for (_batch_key)
    k_step: int
    asks: list[ProposalRequest]


def _batch_key(decodes: list[Request], num_prefill_tokens: int) -> tuple:
    """What a step's asks depend on: its decodes, each at its length, and the prefill beside them."""
    return num_prefill_tokens, tuple((r.request_id, r.num_tokens) for r in decodes)
