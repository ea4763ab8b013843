"""tools/train_demo: the same seed gives the same tokenizer and the same weights, and the run
prints its loss curve (a few steps on a small slice of the stdlib, not the full training)."""

from __future__ import annotations

import argparse

import torch

from tools.train_demo import SHAPES, sample_batch, stdlib_texts, token_stream, train, train_tokenizer


def _args(**kw) -> argparse.Namespace:
    base = dict(seed=0, steps=3, batch_size=2, seq_len=32, lr=2e-3, draft_lr=3e-3, warmup=2, distill=0.7,
                log_every=1, eval_every=3)
    return argparse.Namespace(**{**base, **kw})


def _run(texts, capsys, **kw):
    tok = train_tokenizer(texts, 400)
    stream = token_stream(tok, texts)
    eval_batches = [sample_batch(stream, 2, 32, torch.Generator().manual_seed(1234))]
    target, draft, curve = train(_args(**kw), stream, eval_batches, tok.get_vocab_size())
    return tok.to_str(), target.state_dict(), draft.state_dict(), curve, capsys.readouterr().out


def test_same_seed_same_models_and_a_printed_curve(capsys):
    texts = [t for _, t in stdlib_texts(heldout=True)[:6]]
    tok_a, target_a, draft_a, curve_a, out = _run(texts, capsys)
    tok_b, target_b, draft_b, curve_b, _ = _run(texts, capsys)
    assert tok_a == tok_b
    for a, b in ((target_a, target_b), (draft_a, draft_b)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert curve_a == curve_b and [c["step"] for c in curve_a] == [1, 2, 3]
    assert "agreement" in curve_a[-1]  # the held-out evaluation is part of the curve
    assert len([line for line in out.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]) == 3
    # a different seed trains different weights
    _, target_c, _, _, _ = _run(texts, capsys, seed=1)
    assert not all(torch.equal(target_a[k], target_c[k]) for k in target_a)


def test_draft_is_shallower_than_target():
    assert SHAPES["draft"]["num_hidden_layers"] * 4 <= SHAPES["target"]["num_hidden_layers"]
