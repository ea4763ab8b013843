"""Train the bundled demo pair on CPU: a byte-level BPE tokenizer and two Llama models sharing it.

    python -m tools.train_demo --out models/tandem-demo-code [--steps 800] [--seed 0]

The corpus is the source of the Python standard library of the interpreter running this script
(found through `sysconfig`), so the pair is a tiny code model that continues Python. About 5% of
the files, chosen by a hash of their path, are held out for evaluation.

Both models see the same batches in one loop. The target takes a plain causal-LM step; the draft
(one layer, so its decode step costs a fraction of the target's) learns from a mix of the true next
token and the target's distribution on that batch (online distillation), which is what makes it
agree with the target often: that agreement is what speculative decoding turns into speed.

Output, in Hugging Face layout so that the engine and transformers both load it:
    <out>/target/, <out>/draft/   config.json, model.safetensors (bfloat16), generation_config.json,
                                  tokenizer.json, tokenizer_config.json,
                                  chat_template.jinja
    <out>/README.md               the model card, with the figures of this run
The run is deterministic for a given seed (same interpreter, same torch, same thread count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2
# Words keep the one space that follows them ("def ", "import ", "= "), newlines and indentation
# are tokens of their own: a prompt that ends in "def " or in an indented new line then ends on a
# token boundary the model has seen in training, which a leading-space scheme (GPT-2) does not give.
SPLIT_PATTERN = r"[\p{L}_][\p{L}\p{N}_]* ?|\p{N}+ ?|[^\s\p{L}\p{N}_]+ ?|[\r\n]+|[^\S\r\n]+"
MAX_FILE_BYTES = 1_000_000
MAX_POSITIONS = 1024

# Same layer shape in both, so the draft is cheaper by depth alone: 16 layers against 1. The target is
# deep and narrow because batch-1 decode on a CPU costs per layer more than per parameter: at about
# the same parameter count, 8 layers of width 256 made the one-layer draft cost 0.11-0.20x of the
# target's step, 16 layers of width 192 make it 0.09x (transformers, float32, one thread).
SHAPES = {
    "target": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=16, num_attention_heads=6,
                   num_key_value_heads=2),
    "draft": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=1, num_attention_heads=6,
                  num_key_value_heads=2),
}


# ---- corpus ---------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str) -> bool:
    """About one file in twenty, chosen by path so that the split does not depend on file order."""
    return hashlib.sha256(rel_path.encode()).digest()[0] < 13


def stdlib_texts(heldout: bool) -> list[tuple[str, str]]:
    """(relative path, source) of the stdlib's .py files on one side of the split, sorted by path.

    Files that are not UTF-8 (a few deliberately broken test inputs) or are very large are skipped.
    """
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "__pycache__" in rel or is_heldout(rel) != heldout:
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            out.append((rel, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token: no <unk>
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Llama style: encode(text) starts with <s>; nothing is appended.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1), (EOS, 2)]
    )
    return tok


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All files as one stream of ids: <s> file </s> <s> file </s> ..."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += [1, *enc.ids, 2]
    return torch.tensor(ids, dtype=torch.int32)


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    # -> [batch, seq_len + 1]: inputs are [:, :-1], next-token labels [:, 1:]
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()


# ---- models ---------------------------------------------------------------------------------------


def build_model(kind: str, vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **SHAPES[kind],
    )
    return LlamaForCausalLM(config)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # down to 10% of peak


@torch.no_grad()
def evaluate(target, draft, batches: list[torch.Tensor]) -> dict[str, float]:
    """Held-out loss of both models and the draft's teacher-forced greedy agreement with the target."""
    target.eval(), draft.eval()
    t_loss = d_loss = agree = n = 0.0
    for b in batches:
        x, y = b[:, :-1], b[:, 1:]
        t_logits, d_logits = target(input_ids=x).logits.float(), draft(input_ids=x).logits.float()
        t_loss += F.cross_entropy(t_logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        d_loss += F.cross_entropy(d_logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        agree += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
        n += y.numel()
    target.train(), draft.train()
    return {"target_loss": t_loss / n, "draft_loss": d_loss / n, "agreement": agree / n}


@torch.no_grad()
def greedy_agreement(target, draft, sequences: list[list[int]]) -> float:
    """Fraction of positions where the draft's argmax next token equals the target's, teacher-forced
    on the given token sequences: the per-token acceptance rate of greedy speculative decoding."""
    agree = total = 0
    for ids in sequences:
        x = torch.tensor([ids])
        t = target(input_ids=x).logits.argmax(-1)
        d = draft(input_ids=x).logits.argmax(-1)
        agree += (t == d).sum().item()
        total += t.numel()
    return agree / total


@torch.no_grad()
def decode_step_seconds(model, context: int = 128, steps: int = 32) -> float:
    """Median seconds of one batch-1 decode step (one new token, KV cache of `context` tokens)."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    out = model(input_ids=torch.randint(3, model.config.vocab_size, (1, context), generator=gen))
    cache, tok, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_cost_ratio(target, draft, rounds: int = 7) -> float:
    """Draft / target decode-step time at float32. Rounds alternate between the two and each model
    keeps its fastest round: on a shared host, other work only ever adds time, so the minimum is
    the closest figure to the cost of the model itself. One thread, as each Tandem process runs
    on a small host (TANDEM_TORCH_THREADS): a second thread speeds up the target's larger matmuls
    but not the draft's, so the ratio measured with training's threads would be pessimistic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t, d = [], []
        for _ in range(rounds):
            t.append(decode_step_seconds(target))
            d.append(decode_step_seconds(draft))
    finally:
        torch.set_num_threads(threads)
    return min(d) / min(t)


# ---- training -------------------------------------------------------------------------------------


def train(args, train_stream: torch.Tensor, eval_batches: list[torch.Tensor], vocab_size: int):
    target = build_model("target", vocab_size, args.seed)
    draft = build_model("draft", vocab_size, args.seed + 1)
    opts = {
        m: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        for m, lr in ((target, args.lr), (draft, args.draft_lr))
    }
    gen = torch.Generator().manual_seed(args.seed)
    curve, window, t0 = [], [], time.time()
    print(f"{'step':>6} {'lr':>8} {'target':>7} {'draft':>7} {'tok/s':>7} {'min':>5}", flush=True)
    for step in range(args.steps):
        batch = sample_batch(train_stream, args.batch_size, args.seq_len, gen)
        x, y = batch[:, :-1], batch[:, 1:].flatten()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t_logits = target(input_ids=x).logits.float().flatten(0, 1)  # [B*S, V]
            d_logits = draft(input_ids=x).logits.float().flatten(0, 1)
        t_logp, d_logp = F.log_softmax(t_logits, -1), F.log_softmax(d_logits, -1)
        t_loss, d_ce = F.nll_loss(t_logp, y), F.nll_loss(d_logp, y)
        d_kl = F.kl_div(d_logp, t_logp.detach(), log_target=True, reduction="batchmean")
        d_loss = (1 - args.distill) * d_ce + args.distill * d_kl
        for model, loss, peak in ((target, t_loss, args.lr), (draft, d_loss, args.draft_lr)):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in opts[model].param_groups:
                group["lr"] = cosine_lr(step, args.steps, peak, args.warmup)
            opts[model].step()
            opts[model].zero_grad(set_to_none=True)
        window.append((t_loss.item(), d_ce.item()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            tl, dl = (sum(v) / len(window) for v in zip(*window, strict=True))
            elapsed = time.time() - t0
            tps = (step + 1) * args.batch_size * args.seq_len / elapsed
            lr = cosine_lr(step, args.steps, args.lr, args.warmup)
            print(f"{step + 1:>6} {lr:>8.2e} {tl:>7.3f} {dl:>7.3f} {tps:>7.0f} {elapsed / 60:>5.1f}", flush=True)
            curve.append({"step": step + 1, "target_train_loss": round(tl, 4), "draft_train_loss": round(dl, 4)})
            window = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ev = evaluate(target, draft, eval_batches)
            print(
                f"  eval @ {step + 1}: held-out loss target {ev['target_loss']:.3f} draft {ev['draft_loss']:.3f}"
                f", agreement {ev['agreement']:.3f}",
                flush=True,
            )
            curve[-1].update({k: round(v, 4) for k, v in ev.items()})
    return target, draft, curve


# The demo models continue Python, so a chat turns into Python: what the system and the user say
# becomes comment lines, an assistant's turn is code, and the model answers with code after the
# last comment. Tools (transformers' `tools=`), an assistant's tool calls and a tool's result are
# comments too. transformers (and Tandem's /v1/chat/completions) read it from chat_template.jinja.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- if tools -%}\n"
    "{{- '# tools: ' + tools | map(attribute='function') | map(attribute='name') | join(', ') + '\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] in ['system', 'developer', 'user'] -%}\n"
    "{{- '# ' + message['content'] | trim | replace('\\n', '\\n# ') + '\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{%- for call in message['tool_calls'] or [] -%}\n"
    "{{- '# call ' + call['function']['name'] + ' ' + call['function']['arguments'] | tojson + '\\n' -}}\n"
    "{%- endfor -%}\n"
    "{{- message['content'] | trim + ('\\n' if message['content'] else '') -}}\n"
    "{%- elif message['role'] == 'tool' -%}\n"
    "{{- '# result: ' + message['content'] | trim | replace('\\n', '\\n# ') + '\\n' -}}\n"
    "{%- else -%}\n"
    "{{- raise_exception('the demo chat template knows the roles system, developer, user, assistant and tool, "
    "not ' + message['role']) -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
)


def save(model: LlamaForCausalLM, tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)
    # Older readers (transformers 4.x and hand-written loaders) look for these two keys.
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


# ---- model card -----------------------------------------------------------------------------------

CARD = """# tandem-demo-code

Two tiny Llama-architecture models that continue Python code, trained from scratch on CPU by
`{command}` (about {minutes:.0f} minutes on 2 CPU cores shared with other work). `target/` is the
model to serve; `draft/` proposes tokens for it in speculative decoding. A demo, not a tool: it
writes text that looks like the standard library, not programs that work.

| | target | draft |
|---|---|---|
| layers | {t[num_hidden_layers]} | {d[num_hidden_layers]} |
| hidden / MLP / heads / KV heads | {t[hidden_size]} / {t[intermediate_size]} / {t[num_attention_heads]} / {t[num_key_value_heads]} | {d[hidden_size]} / {d[intermediate_size]} / {d[num_attention_heads]} / {d[num_key_value_heads]} |
| parameters | {pt:,} | {pd:,} |
| model.safetensors (bfloat16) | {bt:.1f} MB | {bd:.1f} MB |
| train loss, last {log_every} steps (nats/token) | {last[target_train_loss]:.3f} | {last[draft_train_loss]:.3f} |
| held-out loss (nats/token) | {final[target_loss]:.3f} | {final[draft_loss]:.3f} |

Both share one tokenizer: byte-level BPE, {vocab} tokens, `<pad>`=0, `<s>`=1 (prepended by
the post-processor), `</s>`=2 (ends each file in training). Words keep the space that follows
them (`def `, `import ` are single tokens) and newlines and indentation are tokens of their own,
so prompts that end in a space or an indented line end on a boundary seen in training. Embeddings
are tied, RoPE theta 10000, {positions} positions.

**Corpus.** The `.py` files of the Python {corpus[python]} standard library (`sysconfig` stdlib path,
no site-packages, UTF-8 files under 1 MB): {corpus[train_files]} files, {mb:.1f} MB,
{corpus[train_tokens]:,} tokens for training. {corpus[heldout_files]} files ({corpus[heldout_tokens]:,}
tokens), those whose path's SHA-256 starts with a byte below 13, are held out.

**Training.** {steps} steps of {batch} x {seq} tokens ({seen:.1f}M tokens, {epochs:.2f} epochs), AdamW
(betas 0.9/0.95, weight decay 0.1), cosine schedule to 10% of peak, bfloat16 autocast, float32
master weights. Both models see the same batches; the draft learns from
{ce:.1f} x cross-entropy + {distill:.1f} x KL(target || draft) on each batch. Deterministic per seed.

**Speculation.** The draft's greedy next-token agreement with the target on held-out text
(teacher-forced, {n_eval:,} positions): **{final[agreement]:.1%}**. One batch-1 decode step of the
draft costs **{ratio:.2f}x** the target's (transformers, float32, one CPU thread, KV cache of 128 tokens).

| step | target train | draft train | target held-out | draft held-out | agreement |
|---|---|---|---|---|---|
{curve}

**Greedy continuations** by the target (48 tokens):

{samples}
"""


def write_card(out: Path, summary: dict, eval_positions: int) -> None:
    """README.md for the pair in `out`, from the run's summary; samples come from the saved target."""
    tok = Tokenizer.from_file(str(out / "target" / "tokenizer.json"))
    target = LlamaForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    samples = []
    for opening in ("def ", "import ", "class "):
        ids = torch.tensor([tok.encode(opening).ids])
        with torch.no_grad():
            gen = target.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=0)
        samples.append("```python\n" + opening + tok.decode(gen[0, ids.shape[1]:].tolist()).rstrip() + "\n```")
    evals = [c for c in summary["curve"] if "agreement" in c]
    curve = "\n".join(
        f"| {c['step']} | {c['target_train_loss']:.3f} | {c['draft_train_loss']:.3f} | {c['target_loss']:.3f} "
        f"| {c['draft_loss']:.3f} | {c['agreement']:.1%} |"
        for c in evals
    )
    a, cfg = summary["args"], {k: json.loads((out / k / "config.json").read_text()) for k in ("target", "draft")}
    text = CARD.format(
        command=summary["command"], minutes=summary["wall_seconds"] / 60, t=cfg["target"], d=cfg["draft"],
        pt=summary["params"]["target"], pd=summary["params"]["draft"], bt=summary["bytes"]["target"] / 1e6,
        bd=summary["bytes"]["draft"] / 1e6, log_every=a["log_every"], last=summary["curve"][-1],
        final=summary["final"], vocab=cfg["target"]["vocab_size"], positions=MAX_POSITIONS,
        corpus=summary["corpus"], mb=summary["corpus"]["train_bytes"] / 1e6, steps=a["steps"],
        batch=a["batch_size"], seq=a["seq_len"], seen=a["steps"] * a["batch_size"] * a["seq_len"] / 1e6,
        epochs=a["steps"] * a["batch_size"] * a["seq_len"] / summary["corpus"]["train_tokens"],
        ce=1 - a["distill"], distill=a["distill"], n_eval=eval_positions, ratio=summary["step_cost_ratio"],
        curve=curve, samples="\n\n".join(samples),
    )
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("models/tandem-demo-code"))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="target peak learning rate")
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--distill", type=float, default=0.7, help="weight of the target's distribution in the draft's loss")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    train_files, heldout_files = stdlib_texts(heldout=False), stdlib_texts(heldout=True)
    tok = train_tokenizer([t for _, t in train_files], args.vocab_size)
    train_stream = token_stream(tok, [t for _, t in train_files])
    heldout_stream = token_stream(tok, [t for _, t in heldout_files])
    eval_gen = torch.Generator().manual_seed(1234)
    eval_batches = [sample_batch(heldout_stream, 16, args.seq_len, eval_gen) for _ in range(4)]
    corpus = {
        "python": sys.version.split()[0],
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "train_tokens": len(train_stream),
        "heldout_tokens": len(heldout_stream),
        "train_bytes": sum(len(t.encode()) for _, t in train_files),
    }
    print(f"corpus {corpus}, tokenizer ready in {time.time() - t_start:.0f}s", flush=True)

    target, draft, curve = train(args, train_stream, eval_batches, tok.get_vocab_size())
    train_seconds = time.time() - t_start
    # The figures below are those of the weights as shipped: rounded to bfloat16, run at float32.
    target, draft = (m.to(torch.bfloat16).float().eval() for m in (target, draft))
    final = evaluate(target, draft, eval_batches)
    ratio = step_cost_ratio(target, draft)
    print(f"decode step cost draft/target (HF, float32, batch 1): {ratio:.3f}", flush=True)
    if ratio > 0.2:
        print("WARNING: the draft's step costs more than a fifth of the target's", flush=True)

    for kind, model in (("target", target), ("draft", draft)):
        save(model, tok, args.out / kind)
    summary = {
        "corpus": corpus,
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in (("target", target), ("draft", draft))},
        "bytes": {k: (args.out / k / "model.safetensors").stat().st_size for k in ("target", "draft")},
        "final": {k: round(v, 4) for k, v in final.items()},
        "step_cost_ratio": round(ratio, 3),
        "wall_seconds": round(train_seconds),
        "command": " ".join(["python -m tools.train_demo", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "curve": curve,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=2), flush=True)
    write_card(args.out, summary, eval_positions=sum(b[:, 1:].numel() for b in eval_batches))
    print(f"wrote {args.out}/{{target,draft}} and {args.out}/README.md", flush=True)


if __name__ == "__main__":
    # OpenMP worker threads spin while they wait for each other; on a busy shared host the spinning
    # took 2/3 of each step's CPU time (8.5 s a step against 2.5 s with passive waiting, measured on
    # 2 cores under load 6). The runtime reads the setting when it loads, with torch, hence the re-exec.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, sys.orig_argv)
    main()
