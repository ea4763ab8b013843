"""Chat templates (services/scheduler/http/chat.py): found where transformers finds them and rendered
to the same text and token ids as `transformers.apply_chat_template`; a template's refusal, a
broken template and a sandbox escape are errors; the demo model ships a template and
tools/train_demo writes it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import transformers

from services.common.errors import InvalidArgument
from services.scheduler.http.chat import ChatTemplate, TemplateError
from services.scheduler.http.convert import chat_plan
from services.scheduler.http.schemas import ChatCompletionRequest
from shared.text import Tokenizer
from tests.helpers.tokenizers import make_tokenizer_dir

DEMO = Path(__file__).resolve().parents[2] / "models" / "tandem-demo-code"
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "fibonacci numbers\nfast, please"},
    {"role": "assistant", "content": "def fib(n):"},
    {"role": "user", "content": "and tests"},
]
# What Hub templates use: bos/eos tokens, add_generation_prompt, raise_exception, loop controls,
# namespace, tojson, {% generation %} blocks.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "{% if loop.index > 10 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if meta is defined %}{{ meta | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}{{ ns.n }}"
)


def hf_render(model_dir: Path, messages, **kwargs):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    return text, list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_demo_model_chat_equals_transformers():
    for kind in ("target", "draft"):
        template = ChatTemplate.from_dir(DEMO / kind)
        assert template is not None
        text = template.render(MESSAGES)
        expected_text, expected_ids = hf_render(DEMO / kind, MESSAGES)
        assert text == expected_text
        assert text.startswith("<s># You write Python.\n# fibonacci numbers\n# fast, please\ndef fib(n):\n")
        assert Tokenizer.from_dir(DEMO / kind).encode(text, add_special_tokens=False) == expected_ids
    with pytest.raises(TemplateError, match="not function"):
        ChatTemplate.from_dir(DEMO / "target").render([{"role": "function", "content": "x"}])


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_TURNS = [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_a_tool_conversation_renders_as_transformers_renders_it():
    """The chat route hands the template `tools` and each call's arguments as a dict (an OpenAI
    client sends them as JSON text), as transformers' apply_chat_template takes them."""
    body = ChatCompletionRequest(messages=TOOL_TURNS, tools=TOOLS, tool_choice="none", max_tokens=4)
    rendered = []

    async def encode(text):
        rendered.append(text)
        return Tokenizer.from_dir(DEMO / "target").encode(text, add_special_tokens=False)

    asyncio.run(chat_plan(body, "r", ChatTemplate.from_dir(DEMO / "target"), encode, 1024))
    as_dicts = [
        {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": {"city": "Paris"}}} for c in m["tool_calls"]]}
        if m.get("tool_calls") else m
        for m in TOOL_TURNS
    ]
    expected, _ = hf_render(DEMO / "target", as_dicts, tools=TOOLS)
    assert rendered == [expected]
    assert expected == '<s># tools: get_weather\n# weather in Paris?\n# call get_weather {"city": "Paris"}\n# result: sunny\n'


def test_train_demo_writes_the_template(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    from tools.train_demo import CHAT_TEMPLATE, build_model, save

    tok = HFTokenizer.from_file(str(DEMO / "target" / "tokenizer.json"))
    save(build_model("draft", tok.get_vocab_size(), 0), tok, tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert (
        DEMO / "target" / "chat_template.jinja"
    ).read_text() == CHAT_TEMPLATE  # the bundled copy is current
    assert hf_render(tmp_path, MESSAGES) == hf_render(DEMO / "target", MESSAGES)


@pytest.mark.parametrize("where", ["file", "config", "config-list"])
def test_a_template_from_each_place_renders_like_transformers(tmp_path, where):
    make_tokenizer_dir(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if where == "file":
        (tmp_path / "chat_template.jinja").write_text(RICH_TEMPLATE)
    elif where == "config":
        config["chat_template"] = RICH_TEMPLATE
    else:
        config["chat_template"] = [
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": RICH_TEMPLATE},
        ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.from_dir(tmp_path)
    kwargs = {"meta": {"a": "é<b>"}}
    text = template.render(MESSAGES, **kwargs)
    expected_text, expected_ids = hf_render(tmp_path, MESSAGES, **kwargs)
    assert text == expected_text and text.endswith('{"a": "é<b>"}<|assistant|>\n4')
    assert Tokenizer.from_dir(tmp_path).encode(text, add_special_tokens=False) == expected_ids
    assert not template.render(MESSAGES, add_generation_prompt=False).endswith("<|assistant|>\n4")
    with pytest.raises(TemplateError, match="no tools here"):
        template.render([{"role": "tool", "content": "x"}])


def test_no_template_a_broken_one_and_the_sandbox(tmp_path):
    make_tokenizer_dir(tmp_path)
    assert ChatTemplate.from_dir(tmp_path) is None
    tokenizer = Tokenizer.from_dir(tmp_path)

    async def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidArgument, match="no chat template") as e:
        asyncio.run(chat_plan(request, "r1", None, encode, 512))
    assert e.value.field == "messages"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate.from_dir(tmp_path)
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        escape.render(MESSAGES)
    mutate = ChatTemplate("{{ messages.append(1) }}")  # immutable: a template cannot change its input
    with pytest.raises(TemplateError):
        mutate.render(MESSAGES)


def test_the_scheduler_with_its_http_api_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, services.scheduler.app, services.scheduler.http; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
