"""TensorRT-LLM's real contract, point by point, against the fake that models it
(tests/fakes/fake_tensorrt_llm.py): long prompts and chunked prefill, submission errors,
`not_finished` from a context-only request, stop tokens kept in the output exactly as the
torch engine keeps them, the first token as the first streamed update, and the drafter
called once per step for the whole batch, padded, with the current `Drafter.__init__`."""

from __future__ import annotations

import json
import threading

import pytest

from shared.engine import (
    AsyncEngine,
    EngineConfig,
    FinishReason,
    FirstToken,
    InvalidRequest,
    LLMEngine,
    SamplingParams,
)
from shared.engine.interface import EngineClient
from shared.engines.trtllm.config import (
    ModelInfo,
    TrtllmApi,
    TrtllmSettings,
    check,
    llm_kwargs,
    read_model_info,
)
from shared.engines.trtllm.convert import Handoff, sampling_params
from shared.engines.trtllm.drafter import remote_drafter
from shared.engines.trtllm.engine import TrtllmEngine
from shared.kv.errors import KvTransferError
from tests.fakes import fake_tensorrt_llm as fake

API = TrtllmApi.from_namespace(fake)
VOCAB = 128
PROMPT = [1, *range(10, 30)]


@pytest.fixture(autouse=True)
def shut_down_fakes():
    """Contexts a test left held for transfer must not count in another test's transfer_pending()."""
    yield
    fake.shutdown_all()


@pytest.fixture
def model_dir(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "eos_token_id": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def build(model_dir, role: str, *, drafter=None, eos=None, **overrides) -> TrtllmEngine:
    info = read_model_info(str(model_dir))
    if eos is not None:
        info = ModelInfo(**{**info.__dict__, "eos_token_ids": eos})
    settings = TrtllmSettings(model=str(model_dir), role=role, tokens_per_block=16, max_batched_tokens=64, **overrides)
    return TrtllmEngine.build(settings, info, api=API, drafter=drafter)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def expected(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(fake.next_token(seq, VOCAB))
    return seq[len(prompt) :]


async def collect(stream) -> list:
    return [out async for out in stream]


def tokens_of(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


# -- one interface, two engines ---------------------------------------------------------------


def test_both_engines_implement_the_engine_interface():
    verbs = [name for name in vars(EngineClient) if not name.startswith("_")]
    assert {"generate", "abort", "stats", "info", "reserve", "import_kv", "add_prefilled", "prefill", "release"} <= set(
        verbs
    )
    for engine_cls in (AsyncEngine, TrtllmEngine):
        missing = [v for v in verbs if not callable(getattr(engine_cls, v, None))]
        assert not missing, f"{engine_cls.__name__} lacks {missing}"


# -- prompts longer than max_num_tokens -------------------------------------------------------


async def test_a_prompt_longer_than_max_num_tokens_is_prefilled_in_chunks(model_dir):
    """TANDEM_MAX_BATCHED_TOKENS=64 and a 300-token prompt: served, because the adapter turns
    chunked prefill on (the real LLM refuses it otherwise, below)."""
    prompt = [1, *((i % 100) + 5 for i in range(299))]
    engine = build(model_dir, "decode")
    assert engine.llm.args["enable_chunked_prefill"] is True
    assert tokens_of(await collect(engine.generate("r", prompt, greedy(4, ignore_eos=True)))) == expected(prompt, 4)
    prefill = build(model_dir, "prefill")
    out = await prefill.prefill("p", prompt, greedy(4))
    assert out.first.new_token_ids == expected(prompt, 1)


def test_without_chunked_prefill_the_real_llm_raises_request_error(model_dir):
    """The rule the adapter avoids: LLM._check_arguments (PyTorch backend)."""
    import asyncio

    llm = fake.LLM(str(model_dir), max_num_tokens=64, skip_tokenizer_init=True)

    async def submit():
        llm.generate_async(list(range(1, 70)), fake.SamplingParams(end_id=2, max_tokens=2))

    with pytest.raises(fake.RequestError, match="should not exceed max_num_tokens"):
        asyncio.run(submit())


@pytest.mark.parametrize("error", ["request_error", "value_error"])
async def test_submission_errors_become_invalid_argument_naming_the_prompt(model_dir, error):
    engine = build(model_dir, "decode")
    if error == "request_error":
        engine.llm.chunked_prefill = False  # as if the LLM refused the length itself
        prompt = [1, *range(5, 105)]
    else:
        engine.llm.max_seq_len = 20  # the executor's own length check fires (ValueError)
        prompt = PROMPT
    with pytest.raises(InvalidRequest) as info:
        await collect(engine.generate("r", prompt, greedy(4)))
    assert info.value.field == "prompt" and "refused by TensorRT-LLM" in str(info.value)
    assert not engine._requests


# -- context-only requests end with not_finished ------------------------------------------------


@pytest.mark.parametrize("reason", ["not_finished", "length"])
async def test_a_context_that_ends_not_finished_or_length_goes_on_to_generation(model_dir, reason):
    prefill, decode = build(model_dir, "prefill"), build(model_dir, "decode")
    prefill.llm.context_finish_reason = reason
    params = greedy(6, ignore_eos=True)
    out = await prefill.prefill("r", PROMPT, params)
    assert prefill.llm.requests[-1].outputs[0].finish_reason == reason
    reservation = await decode.reserve("r", PROMPT, params)
    first = FirstToken(out.first.new_token_ids[0])
    outs = await collect((await decode.add_prefilled(reservation, first, out.handoff)).outputs)
    assert out.first.new_token_ids + tokens_of(outs) == expected(PROMPT, 6)


@pytest.mark.parametrize("reason", ["cancelled", "timeout", "stop"])
async def test_a_context_that_ends_otherwise_is_a_failed_transfer(model_dir, reason):
    prefill = build(model_dir, "prefill")
    prefill.llm.context_finish_reason = reason
    with pytest.raises(KvTransferError, match=reason):
        await prefill.prefill("r", PROMPT, greedy(4))
    assert not prefill._requests


# -- stop tokens: the token that ends a request is its last output token, on both engines -------


def test_the_adapter_keeps_stop_tokens_which_tensorrt_llm_would_strip(model_dir):
    info = read_model_info(str(model_dir))
    assert sampling_params(API, greedy(5, stop_token_ids=[7]), info).include_stop_str_in_output is True


async def test_the_fake_strips_a_matched_stop_token_unless_asked_to_keep_it(model_dir):
    llm = fake.LLM(str(model_dir), skip_tokenizer_init=True)
    stop = expected(PROMPT, 3)[2]
    for keep, want in ((False, expected(PROMPT, 2)), (True, expected(PROMPT, 3))):
        params = fake.SamplingParams(end_id=-1, max_tokens=10, stop_token_ids=[stop], include_stop_str_in_output=keep)
        result = await llm.generate_async(PROMPT, params, streaming=True).aresult()
        assert (result.outputs[0].token_ids, result.outputs[0].finish_reason) == (want, "stop")


async def test_stop_and_eos_tokens_end_the_output_as_on_the_torch_engine(model_dir, tmp_path):
    """The same rule on both engines: the EOS or stop token that ended a request is its last
    output token, and the finish reason is STOP."""
    from tests.helpers.models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    torch_engine = LLMEngine(EngineConfig(model=str(ckpt), num_blocks=64, block_size=8))
    prompt = [1, *range(5, 25)]
    free_run = torch_engine.generate([prompt], greedy(8, ignore_eos=True))[0]
    stop = free_run[3]
    cut = free_run[: free_run.index(stop) + 1]
    aeng = AsyncEngine(torch_engine).start()
    try:
        outs = await collect(aeng.generate("t", prompt, greedy(8, ignore_eos=True, stop_token_ids=[stop])))
    finally:
        aeng.shutdown()
    assert tokens_of(outs) == cut and outs[-1].finish_reason == FinishReason.STOP

    trt = expected(PROMPT, 8)
    stop = trt[3]
    cut = trt[: trt.index(stop) + 1]
    engine = build(model_dir, "decode")
    outs = await collect(engine.generate("s", PROMPT, greedy(8, stop_token_ids=[stop])))
    assert tokens_of(outs) == cut and outs[-1].finish_reason == FinishReason.STOP
    eos_engine = build(model_dir, "decode", eos=[stop])
    outs = await collect(eos_engine.generate("e", PROMPT, greedy(8)))
    assert tokens_of(outs) == cut and outs[-1].finish_reason == FinishReason.STOP


# -- the first token is the first streamed update ------------------------------------------------


async def test_the_first_streamed_update_carries_the_first_token(model_dir):
    engine = build(model_dir, "decode")
    engine.llm.step_s = 0.05
    stream = engine.generate("r", PROMPT, greedy(10, ignore_eos=True))
    first = await stream.__anext__()
    assert first.new_token_ids == expected(PROMPT, 1) and first.num_output_tokens == 1
    await stream.aclose()


async def test_a_generation_only_request_streams_from_the_second_token(model_dir):
    prefill, decode = build(model_dir, "prefill"), build(model_dir, "decode")
    params = greedy(5, ignore_eos=True)
    out = await prefill.prefill("r", PROMPT, params)
    reservation = await decode.reserve("r", PROMPT, params)
    prefilled = await decode.add_prefilled(reservation, FirstToken(out.first.new_token_ids[0]), out.handoff)
    outs = await collect(prefilled.outputs)
    assert outs[0].new_token_ids == expected(PROMPT, 2)[1:]
    raw = decode.llm.requests[-1].outputs[0]
    assert raw.token_ids[0] == Handoff.decode(out.handoff).first_gen_tokens[0], "token_ids start with it"


# -- the remote drafter under the executor's contract ---------------------------------------------


class RecordingOracle:
    """Proposes the target's own tokens; records each call's batch."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.threads: set[str] = set()

    def propose(self, asks):
        self.calls.append([a.seq_id for a in asks])
        self.threads.add(threading.current_thread().name)
        return [expected(a.token_ids, a.k) for a in asks]


def oracle():
    return RecordingOracle()


def test_the_drafter_uses_the_current_drafter_signature_and_asks_for_kv_extension():
    drafter = remote_drafter(fake.Drafter, oracle, max_draft_len=4)
    assert (drafter.max_draft_len, drafter.max_total_draft_tokens, drafter._static_max_total_draft_tokens) == (4, 4, 4)
    assert drafter._needs_padding_kv_extension is True


def test_the_decode_side_with_a_drafter_runs_without_the_overlap_scheduler(model_dir):
    info = read_model_info(str(model_dir))
    settings = check(
        TrtllmSettings(model=str(model_dir), role="decode", tokens_per_block=16, max_batched_tokens=64,
                       num_speculative_tokens=3, draft_addr="draft:50054"),
        info,
    )
    kwargs = llm_kwargs(API, settings, drafter=remote_drafter(fake.Drafter, oracle, max_draft_len=3))
    assert kwargs["disable_overlap_scheduler"] is True and kwargs["speculative_config"].max_draft_len == 3


async def test_one_batched_drafter_call_per_step_for_every_generation_request(model_dir):
    import asyncio

    drafter = remote_drafter(fake.Drafter, oracle, max_draft_len=3)
    engine = build(model_dir, "decode", drafter=drafter, num_speculative_tokens=3, draft_addr="draft:50054")
    engine.llm.step_s = 0.02  # the three requests meet in the executor's steps
    prompts = {f"r{i}": [1, *range(10 + i, 30 + i)] for i in range(3)}
    results = await asyncio.gather(
        *(collect(engine.generate(rid, p, greedy(9, ignore_eos=True))) for rid, p in prompts.items())
    )
    for (rid, p), outs in zip(prompts.items(), results, strict=True):
        assert tokens_of(outs) == expected(p, 9), rid
    client = drafter.client
    assert max(len(c) for c in client.calls) == 3, "all generation requests of a step in one call"
    assert len(client.calls) == len(engine.llm.drafter_batches), "one call per step"
    assert all(len(set(c)) == len(c) for c in client.calls)
    assert client.threads and "MainThread" not in client.threads, "synchronous, off the event loop"


async def test_drafts_shorter_than_the_maximum_are_padded_with_the_kv_extended(model_dir):
    """Near max_tokens the drafter proposes fewer than max_draft_len tokens; the executor pads
    them, and only the extension the drafter asks for keeps the KV right."""

    class Plain(fake.Drafter):  # a drafter that forgets the flag
        def __init__(self):
            super().__init__(max_draft_len=3, max_total_draft_tokens=3)

        def prepare_draft_tokens(self, scheduled_requests, resource_manager=None):
            for r in scheduled_requests.generation_requests:
                r.py_draft_tokens = [1]

    drafter = remote_drafter(fake.Drafter, oracle, max_draft_len=3)
    engine = build(model_dir, "decode", drafter=drafter, num_speculative_tokens=3, draft_addr="draft:50054")
    outs = await collect(engine.generate("r", PROMPT, greedy(5, ignore_eos=True)))
    assert tokens_of(outs) == expected(PROMPT, 5)
    assert any(len(c) for c in drafter.client.calls)
    broken = build(model_dir, "decode", drafter=Plain(), num_speculative_tokens=3, draft_addr="draft:50054")
    with pytest.raises(KvTransferError, match="KV capacity extension"):
        await collect(broken.generate("r", PROMPT, greedy(5, ignore_eos=True)))
