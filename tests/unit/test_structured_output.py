"""Structured output (SamplingParams.guidance): every output belongs to the requested language
and ends when it is complete; greedy outputs equal HF transformers' greedy choice among the
tokens llguidance allows at each step, token for token; the request does not speculate (others
in its batch do); a request prefilled elsewhere or resumed on another worker continues the
same output; bad guidance is refused naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import pytest
import torch

from shared.engine import EngineConfig, FinishReason, InvalidRequest, LLMEngine, SamplingParams
from shared.engine.spec import NgramProposer
from shared.guidance import Guide, check, choice_grammar, closed, grammar, lark_grammar
from shared.params import Guidance
from shared.text import Tokenizer
from tests.helpers.models import load_hf, make_tiny_checkpoint
from tests.helpers.tokenizers import EOS_ID

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "count": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["name", "count"],
    "additionalProperties": False,
}
GUIDANCES = {
    "json_schema": Guidance("json_schema", json.dumps(SCHEMA)),
    "json_object": Guidance("json_object"),
    "regex": Guidance("regex", r"(quick|lazy) (fox|dog)[0-9]{2}"),
    "choice": Guidance("lark", choice_grammar(["hello world", "the dog", "über café"])),
}
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("structured"))
    return path, load_hf(path), Tokenizer.from_dir(path)


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), num_blocks=128, block_size=8, **kw))


def hf_guided_greedy(model, path, prompt: list[int], g: Guidance, max_new: int) -> list[int]:
    """The reference: HF's logits, every token outside llguidance's mask set to -inf, argmax."""
    tokenizer = llguidance.LLTokenizer(str(path / "tokenizer.json"), n_vocab=model.config.vocab_size, eos_token=EOS_ID)
    matcher = llguidance.LLMatcher(tokenizer, grammar(g), log_level=0)
    tokens, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_new and not matcher.is_stopped():
            logits = model(torch.tensor([tokens])).logits[0, -1].float()
            words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
            allowed = ((words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[: logits.shape[0]]
            token = int(logits.masked_fill(allowed == 0, float("-inf")).argmax())
            assert matcher.consume_token(token)
            out.append(token)
            tokens.append(token)
    return out


def check_language(kind: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(r"(quick|lazy) (fox|dog)[0-9]{2}", text), text
    else:
        assert text in ("hello world", "the dog", "über café"), text


def run(eng: LLMEngine, prompts, params) -> tuple[list[list[int]], dict]:
    ids = [str(i) for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        eng.add_request(rid, p, params)
    outs, finals = {rid: [] for rid in ids}, {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
            if o.finished:
                finals[o.request_id] = o
    stats = eng.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not eng.requests
    return [outs[r] for r in ids], finals


PROMPTS = ["the quick brown", "hello", "def value(self):"]


@pytest.mark.parametrize("kind", list(GUIDANCES))
def test_greedy_output_is_the_reference_and_in_the_language(ckpt, kind):
    path, model, tok = ckpt
    g = GUIDANCES[kind]
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, guidance=g)
    outs, finals = run(engine(path, max_num_batched_tokens=4), prompts, params)  # chunked prefill, batched
    for prompt, out in zip(prompts, outs, strict=True):
        assert out == hf_guided_greedy(model, path, prompt, g, MAX_TOKENS)
    for rid, out in enumerate(outs):
        if finals[str(rid)].finish_reason is FinishReason.STOP:  # complete (an EOS only where one may follow)
            check_language(kind, tok.decode(out))
    if kind != "json_object":  # bounded languages complete within MAX_TOKENS
        assert all(f.finish_reason is FinishReason.STOP for f in finals.values())


@pytest.mark.parametrize("kind", ["json_schema", "regex", "choice"])
def test_sampled_outputs_are_in_the_language(ckpt, kind):
    path, _, tok = ckpt
    params = SamplingParams(temperature=1.5, max_tokens=MAX_TOKENS, guidance=GUIDANCES[kind], seed=5)
    outs, finals = run(engine(path), [tok.encode(p) for p in PROMPTS * 3], params)
    for rid, out in enumerate(outs):
        assert finals[str(rid)].finish_reason is FinishReason.STOP
        check_language(kind, tok.decode(out))


def test_a_guided_request_does_not_speculate_and_others_still_do(ckpt):
    path, model, tok = ckpt
    eng = engine(path, num_speculative_tokens=3, adaptive_speculation=False)
    eng.set_proposer(NgramProposer())
    prompt = [1, 30, 31, 30, 31, 30, 31]  # repetitive: n-gram proposals exist
    eng.add_request("guided", prompt, SamplingParams(temperature=0.0, max_tokens=20, guidance=GUIDANCES["regex"]))
    eng.add_request("plain", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    finals, outs = {}, {"guided": [], "plain": []}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
            finals[o.request_id] = o
    assert finals["guided"].num_spec_proposed == 0 and finals["plain"].num_spec_proposed > 0
    assert outs["guided"] == hf_guided_greedy(model, path, prompt, GUIDANCES["regex"], 20)


def test_prefilled_elsewhere_and_resumed_requests_continue_the_same_output(ckpt):
    path, _, tok = ckpt
    g = GUIDANCES["json_schema"]
    prompt = tok.encode("hello world")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, guidance=g)
    full = engine(path).generate([prompt], params)[0]
    assert len(full) > 6
    # disaggregated: the prefill engine samples the first token under the mask, the decode engine goes on
    prefill, decode = engine(path), engine(path)
    prefill.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=1, guidance=g), hold_kv=True)
    (first,) = prefill.step()
    assert first.new_token_ids == full[:1]
    kv = prefill.export_kv("r")
    prefill.release("r")
    assert decode.reserve("r", len(prompt) + MAX_TOKENS)
    decode.import_kv("r", kv)
    decode.add_prefilled("r", prompt, first.new_token_ids[0], params)
    rest = []
    while decode.has_unfinished():
        rest += [t for o in decode.step() for t in o.new_token_ids]
    assert first.new_token_ids + rest == full
    # moved mid-generation: the earlier outputs close the prompt, seed_offset counts them
    resumed = engine(path).generate(
        [prompt + full[:5]], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS - 5, seed_offset=5, guidance=g)
    )[0]
    assert resumed == full[5:]
    # earlier outputs outside the language are refused by name
    with pytest.raises(InvalidRequest, match="guidance: the tokens generated so far"):
        engine(path).add_request("x", prompt + tok.encode("zz", add_special_tokens=False),
                                 SamplingParams(temperature=0.0, seed_offset=1, guidance=g))


@pytest.mark.parametrize(
    "g,message",
    [
        (Guidance("regex", "a(b"), "invalid regex"),
        (Guidance("json_schema", "{not json"), "not valid JSON"),
        (Guidance("json_schema", "[1, 2]"), "must be a JSON object"),
        (Guidance("json_schema", '{"type": "frob"}'), "invalid json schema"),
        (Guidance("lark", "start: undefined_rule"), "invalid lark"),
        (Guidance("regex", ""), "empty"),
        (Guidance("xml", "x"), "kind must be one of"),
        (Guidance("regex", "a" * 70_000), "more than"),
    ],
)
def test_bad_guidance_is_refused_naming_the_field(ckpt, g, message):
    path, _, _ = ckpt
    eng = engine(path)
    with pytest.raises(InvalidRequest, match=message) as e:
        eng.add_request("r", [1, 5, 6], SamplingParams(guidance=g))
    assert e.value.field == "guidance" and not eng.requests
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_an_object_that_lists_its_properties_takes_no_others(ckpt):
    """As vLLM's default backend reads a schema: listed properties, and nothing said of others,
    means no others (a property named "properties" is a property, not a keyword)."""
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "list": {"type": "array", "items": {"$ref": "#/$defs/P"}},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
        },
        "$defs": {"P": {"anyOf": [{"type": "object", "properties": {"b": {"type": "string"}}}, {"type": "null"}]}},
    }
    got = closed(schema)
    assert got["additionalProperties"] is False
    assert got["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in got["properties"]  # the property map itself is left alone
    assert got["$defs"]["P"]["anyOf"][0]["additionalProperties"] is False
    assert got["properties"]["open"]["additionalProperties"] is True
    assert schema["properties"]["properties"] == {"type": "object", "properties": {"a": {"type": "integer"}}}
    # a composition is left open: closing allOf's parts would leave only {} (a and b each excluded)
    composed = {"allOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"type": "integer"}}}]}
    assert closed(composed) == composed
    # so the engine's matcher takes {"a": 1} and refuses another key
    path, _, tok = ckpt
    guide = Guide(path, 400, [EOS_ID])
    g = Guidance("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    ok = tok.encode('{"a": 1}', add_special_tokens=False)
    extra = tok.encode('{"a": 1, "b": 2}', add_special_tokens=False)
    assert guide.matcher(g).validate_tokens(ok) == len(ok)
    assert guide.matcher(g).validate_tokens(extra) < len(extra)


def test_gbnf_grammars_are_converted_and_bad_ones_named():
    """vLLM's guided_grammar is often GBNF (rules with ::=): it is converted to llguidance's Lark."""
    gbnf = 'root ::= "yes" | "no"'
    g = Guidance("lark", lark_grammar(gbnf))
    check(g)
    with pytest.raises(InvalidRequest, match="guidance: invalid"):
        check(Guidance("lark", lark_grammar("root ::= (")))


def test_a_schema_nested_too_deeply_is_refused_not_a_crash():
    deep = '{"type": "array", "items": ' * 5000 + "{}" + "}" * 5000
    with pytest.raises(InvalidRequest, match="guidance:"):
        check(Guidance("json_schema", deep))


def test_a_tokenizer_llguidance_cannot_read_is_refused_once_found(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    guide = Guide(tmp_path, 400, [EOS_ID])
    guide.warm()
    for _ in range(2):  # the second request is told the same, without another attempt
        with pytest.raises(InvalidRequest, match="not available for this model's tokenizer"):
            guide.matcher(GUIDANCES["regex"])
    with pytest.raises(InvalidRequest, match="tokenizer.json missing"):
        Guide(tmp_path / "nowhere", 400, [EOS_ID]).matcher(GUIDANCES["regex"])


async def test_the_async_engine_compiles_grammars_off_the_engine_thread(ckpt):
    """A grammar can take long to compile; the batch the engine thread runs must not wait for it."""
    import threading

    from shared.engine import AsyncEngine

    path, model, tok = ckpt
    eng = engine(path)
    compiled_on, matcher_for = [], eng.matcher_for

    def recording(*args):
        compiled_on.append(threading.current_thread().name)
        return matcher_for(*args)

    eng.matcher_for = recording
    aeng = AsyncEngine(eng).start()
    try:
        prompt = tok.encode("hello")
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, guidance=GUIDANCES["regex"])
        out = [t async for o in aeng.generate("r", prompt, params) for t in o.new_token_ids]
    finally:
        aeng.shutdown()
    assert compiled_on and "engine" not in compiled_on
    assert out == hf_guided_greedy(model, path, prompt, GUIDANCES["regex"], MAX_TOKENS)
