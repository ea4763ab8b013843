"""Tokenizer, incremental detokenizer and stop strings (shared/text.py), on tokenizers trained here."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from shared.text import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopStringMatcher,
    TextStream,
    Tokenizer,
    tokenizer_mismatch,
    validate_stop_strings,
)
from tests.helpers.tokenizers import BOS_ID, EOS_ID, make_tokenizer_dir

ROOT = Path(__file__).resolve().parents[2]

# Characters the training text never saw, so byte-level BPE splits them into single bytes.
MULTIBYTE = "héllo wörld 日本語 🙂 — Grüße aus Zürich, 東京タワー 😀🎉 한국 naïve ß ñ 👩‍💻 done."


@pytest.fixture
def tok(tmp_path) -> Tokenizer:
    return Tokenizer.from_dir(make_tokenizer_dir(tmp_path))


def stream_deltas(tok: Tokenizer, prompt: str, ids: list[int], chunk: int = 1) -> list[str]:
    detok = IncrementalDetokenizer(tok, tok.encode(prompt))
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas + [detok.flush()]


def gen_ids(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of text as a model would generate them (no BOS)."""
    ids = tok.encode(text)
    return ids[1:] if ids[:1] == [tok.bos_token_id] else ids


# --- Tokenizer ---------------------------------------------------------------------------------


def test_from_dir_reads_bos_eos_and_round_trips(tok):
    assert tok.bos_token_id == BOS_ID
    assert tok.eos_token_ids == [EOS_ID]
    assert 300 <= tok.vocab_size <= 500
    assert tok.id_to_token(EOS_ID) == "</s>"
    ids = tok.encode(MULTIBYTE)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert tok.decode(ids) == MULTIBYTE
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + MULTIBYTE


def test_bos_not_doubled_when_post_processor_adds_it(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, post_processor_bos=True))
    ids = tok.encode("hello world")
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert tok.decode(ids) == "hello world"


def test_no_bos_when_config_says_no(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, add_bos_token=False))
    assert BOS_ID not in tok.encode("hello world")


def test_generation_config_eos_list_and_config_fallbacks(tmp_path):
    d = make_tokenizer_dir(tmp_path, generation_config={"eos_token_id": [2, 0]})
    assert Tokenizer.from_dir(d).eos_token_ids == [2, 0]
    # Neither tokenizer_config nor generation_config: config.json supplies the ids.
    (d / "tokenizer_config.json").unlink()
    (d / "generation_config.json").unlink()
    (d / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, [2])


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_module_does_not_import_torch_or_grpc():
    # The scheduler imports shared.text and must not pay for loading torch.
    code = "import sys, shared.text; print(sorted({'torch', 'grpc'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- IncrementalDetokenizer --------------------------------------------------------------------


def test_streaming_equals_full_decode_and_never_emits_broken_utf8(tok):
    ids = gen_ids(tok, MULTIBYTE)
    # The test only means something if some characters really are split across tokens.
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids)
    for chunk in (1, 2, 3, 7):
        deltas = stream_deltas(tok, "Translate:", ids, chunk)
        assert "".join(deltas) == tok.decode(ids) == MULTIBYTE
        assert not any(REPLACEMENT_CHAR in d for d in deltas)
        assert deltas[-1] == ""  # nothing was left pending at the end


def test_split_character_is_held_back_then_released(tok):
    ids = gen_ids(tok, "ok 😀")
    detok = IncrementalDetokenizer(tok, [BOS_ID])
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) == "ok 😀"
    assert deltas[-1].endswith("😀") and "" in deltas  # the emoji bytes waited for each other


def test_flush_returns_incomplete_tail(tok):
    ids = gen_ids(tok, "ok 😀")
    detok = IncrementalDetokenizer(tok, [BOS_ID])
    text = "".join(detok.push([i]) for i in ids[:-1])
    assert REPLACEMENT_CHAR not in text
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT_CHAR)  # generation ended mid-character: shown, not dropped
    assert text + tail == tok.decode(ids[:-1])


def test_special_tokens_skipped_or_kept(tok):
    ids = gen_ids(tok, "hello") + [EOS_ID]
    assert "".join(stream_deltas(tok, "x", ids)) == "hello"
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert detok.push(ids) + detok.flush() == "hello</s>"


def test_a_long_run_of_skipped_special_tokens_keeps_the_window_small(tok):
    words = gen_ids(tok, "hello world")
    ids = words[:1] + [EOS_ID] * 2000 + [BOS_ID] + words[1:] + [EOS_ID] * 5
    detok = IncrementalDetokenizer(tok, [BOS_ID])
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids) == "hello world"
    assert len(detok._ids) < 20  # each push decodes a few tokens, not the run of EOS behind them


def test_sentencepiece_space_between_prompt_and_completion(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, kind="metaspace"))
    prompt, completion = tok.encode("the quick"), gen_ids(tok, "brown fox")
    assert tok.decode(completion) == "brown fox"  # decoded alone, the leading "▁" is dropped
    assert "".join(stream_deltas(tok, "the quick", completion)) == " brown fox"
    assert tok.decode(prompt + completion) == "the quick brown fox"


# --- StopStringMatcher -------------------------------------------------------------------------


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = m.push(piece)
        out.append(text)
        if stopped:
            assert m.push("more text") == ("", True)  # nothing after a stop
            return "".join(out), True
    return "".join(out) + m.flush(), False


@pytest.mark.parametrize(
    "stops, pieces, expected",
    [
        (["STOP"], ["hello ST", "O", "P world"], ("hello ", True)),
        (["\n\n", "END"], ["a\n", "b E", "N", "D c"], ("a\nb ", True)),
        (["abcd", "bc"], ["a", "b", "c", "d"], ("a", True)),
        (["abcd", "bc"], ["abcd"], ("a", True)),  # same answer however the text is chunked
        (["abcd", "bcx"], ["ab", "cd"], ("", True)),
        (["Hi"], ["Hi there"], ("", True)),  # stop at the very start
        (["xyz"], ["ab", "xy"], ("abxy", False)),  # held-back prefix flushed at the end
        ([], ["free ", "text"], ("free text", False)),
    ],
)
def test_stop_strings(stops, pieces, expected):
    assert run_matcher(stops, pieces) == expected


def test_matcher_names_the_stop_string_that_matched():
    m = StopStringMatcher(["abcd", "bc", "zz"])
    assert m.matched is None
    for piece in "abcd":
        m.push(piece)
    assert m.stopped and m.matched == "bc"  # the one that ended first


def test_matcher_holds_only_possible_stop_prefixes():
    m = StopStringMatcher(["<|end|>"])
    assert m.push("abc<|e") == ("abc", False)
    assert m.push("x") == ("<|ex", False)  # no longer a prefix: released
    assert m.push("<|end|> tail") == ("", True)


def test_matcher_chunking_never_changes_the_result():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 20)))
        # Reference on the whole text: the stop occurrence that ends first, then the longest.
        hits = [(text.find(s) + len(s), -text.find(s)) for s in stops if s in text]
        expected = (text[: -min(hits)[1]], True) if hits else (text, False)
        cuts = (
            sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 5)))) if text else []
        )
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert run_matcher(stops, pieces) == expected, (stops, pieces)


# --- TextStream ----------------------------------------------------------------------------------


def test_text_stream_cuts_stop_spanning_token_boundaries(tok):
    text = "héllo wörld 日本語 🙂 東京タワー the end 😀 after"
    ids = gen_ids(tok, text)
    for stop, before in [("タワー", "héllo wörld 日本語 🙂 東京"), ("🙂 東", "héllo wörld 日本語 ")]:
        ts = TextStream(tok, tok.encode("Q:"), stops=[stop, "never"])
        deltas = []
        for i in ids:
            delta, stopped = ts.push([i])
            deltas.append(delta)
            if stopped:
                break
        assert stopped and "".join(deltas) == before == ts.text
        assert not any(REPLACEMENT_CHAR in d for d in deltas)
        assert ts.push(ids[-2:]) == ("", True) and ts.finish() == ""


def test_text_stream_finish_flushes_held_text(tok):
    ids = gen_ids(tok, "the quick brown fox jum")
    ts = TextStream(tok, [BOS_ID], stops=["jumps"])
    out = "".join(ts.push([i])[0] for i in ids)
    assert out == "the quick brown fox "  # "jum" might still become "jumps"
    assert ts.finish() == "jum"
    assert ts.text == "the quick brown fox jum" and not ts.stopped


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stops, match",
    [("stop", "list"), ([""], "empty"), (["a"] * 17, "at most 16"), (["x" * 257], "longer"), ([3], "string")],
)
def test_validate_stop_strings_rejects(stops, match):
    with pytest.raises(ValueError, match=match) as err:
        validate_stop_strings(stops)
    assert str(err.value).startswith("stop")


def test_validate_stop_strings_accepts():
    assert validate_stop_strings(None) == []
    assert validate_stop_strings(("a", "b" * 256)) == ["a", "b" * 256]


def test_a_draft_must_share_the_targets_tokenizer(tmp_path):
    from tests.helpers.tokenizers import make_tokenizer_dir

    target = make_tokenizer_dir(tmp_path / "target")
    same = make_tokenizer_dir(tmp_path / "same", add_bos_token=False)  # same vocabulary
    other = make_tokenizer_dir(tmp_path / "other", kind="metaspace")
    assert tokenizer_mismatch(target, same) is None
    why = tokenizer_mismatch(target, other)
    assert why is not None and "must share the target's tokenizer" in why


def test_token_bytes_join_into_the_text(tok):
    # OpenAI's logprobs `bytes`: tokens that are pieces of a UTF-8 character (their text is
    # U+FFFD) still give their own bytes, so the bytes of a choice's tokens join into its text
    ids = gen_ids(tok, MULTIBYTE)
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert b"".join(tok.token_bytes(i) for i in ids) == MULTIBYTE.encode()


def test_token_bytes_of_sentencepiece_byte_fallbacks(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "a": 257}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    text = "aé日a"
    ids = tok.encode(text)
    assert len(ids) == 1 + 2 + 3 + 1  # é and 日 as their UTF-8 bytes
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
