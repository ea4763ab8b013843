"""Tiny random Llama-family checkpoints written on the fly (HF layout), no network.

Weights are drawn with a large init std so the next-token distribution is peaked: greedy
comparisons against HF transformers then do not hinge on float rounding of near-ties.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizers import BOS_ID, EOS_ID, VOCAB_SIZE, make_tokenizer_dir

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),  # fused qkv_proj / gate_up_proj
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),  # Gemma 3's text model
}


def make_tiny_checkpoint(path: Path, arch: str = "llama", *, tie: bool = False, num_layers: int = 2,
                         hidden: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                         max_positions: int = 512, rope_scaling: dict | None = None,
                         sharded: bool = False, std: float = 0.08, weights: str = "safetensors",
                         **extra) -> Path:
    import transformers

    cfg_name, model_name = ARCHS[arch]
    path = Path(path)
    make_tokenizer_dir(path)
    kwargs = dict(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=std,
        rms_norm_eps=1e-6,
    )
    if rope_scaling is not None:
        kwargs["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
    if arch == "phi3":
        kwargs["pad_token_id"] = 0  # its default (32000) is past the tiny vocabulary
    kwargs.update(extra)
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # biases default to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, std)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's per-head norms
                p.uniform_(0.5, 1.5)
            elif arch == "gemma3" and name.endswith("norm.weight"):  # stored as an offset from 1
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(path, max_shard_size="200KB" if sharded else "2GB")
    if weights == "bin":
        to_pytorch_bin(path)
    return path


def to_pytorch_bin(path: Path, *, legacy: bool = False) -> None:
    """Rewrites a checkpoint's safetensors files as PyTorch's pytorch_model*.bin (+ index), the
    way older Hugging Face checkpoints ship; `legacy`: the pre-zipfile torch.save format."""
    import json

    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    names = {"model.safetensors": "pytorch_model.bin"}
    if index.is_file():
        data = json.loads(index.read_text())
        names = {f: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
                 for f in set(data["weight_map"].values())}
        data["weight_map"] = {k: names[f] for k, f in data["weight_map"].items()}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(data))
        index.unlink()
    for old, new in names.items():
        torch.save(load_file(str(path / old)), path / new, _use_new_zipfile_serialization=not legacy)
        (path / old).unlink()


def load_hf(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy_penalised(
    model,
    prompt: list[int],
    max_new_tokens: int,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
) -> list[int]:
    """Greedy decoding on HF's logits with OpenAI's rule written out: the bias, then
    logit[j] -= count_j * frequency_penalty + (count_j > 0) * presence_penalty over the outputs."""
    tokens, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([tokens])).logits[0, -1].float()
            for t, b in (logit_bias or {}).items():
                logits[t] += b
            for t in set(out):
                logits[t] -= out.count(t) * frequency_penalty + presence_penalty
            out.append(int(logits.argmax()))
            tokens.append(out[-1])
    return out


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


THINK_TAGS = ("<think>", "</think>")


def make_thinking_checkpoint(path: Path, **kw) -> tuple[Path, int, int]:
    """A tiny checkpoint whose vocabulary holds <think> and </think> as one added token each, as
    reasoning models' do (Qwen3, DeepSeek-R1: added, not special, so their text is decoded); the
    model's vocabulary covers them. Returns (path, <think> id, </think> id)."""
    from tokenizers import AddedToken, Tokenizer

    path = Path(path)
    make_tokenizer_dir(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in THINK_TAGS])
    start, end = (tokenizer.token_to_id(tag) for tag in THINK_TAGS)
    make_tiny_checkpoint(path, vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), **kw)
    tokenizer.save(str(path / "tokenizer.json"))  # after make_tiny_checkpoint, which writes the plain one
    return path, start, end
