"""A scheduled batch -> input tensors -> model forward -> logits of the sampled rows.

Owns the device, the model weights and the KV cache tensor
[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hugepages
from .model import (
    AttentionMetadata,
    DecodeGroup,
    LlamaForCausalLM,
    ModelConfig,
    PrefillSeq,
    cpu_kernels,
    load_weights,
)

DECODE_GROUP_MAX = 32  # sequences per batched decode attention call
# On CPU, a sequence's step of at most this many new tokens attends through the decode kernel,
# one row per token, instead of gathering its whole context for SDPA: verifying k proposals and
# a draft's one- or two-token tails cost about what a decode does, not a prefill chunk.
SHORT_AS_DECODE = 17
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SeqInput:
    """One sequence's share of a step: tokens [start, start + n) of `token_ids`."""

    token_ids: list[int]
    start: int
    n: int
    block_ids: list[int]


class ModelRunner:
    def __init__(self, model_dir: str, cfg: ModelConfig, dtype: str, device: str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.rotary.inv_freq = cfg.rope_inv_freq().to(self.device)  # buffer was on meta
        load_weights(model, model_dir, cfg.tie_word_embeddings)
        self.model = model.eval()
        self.kv_cache: torch.Tensor | None = None
        self.block_size = 0
        self._decode_kernel = cpu_kernels.supports(self.device, self.dtype)

    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.cfg
        return c.num_layers * 2 * block_size * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.cfg
        self.block_size = block_size
        shape = (c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        if self.device.type == "cpu":
            self.kv_cache = hugepages.zeros(shape, self.dtype)
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, prefills: list[SeqInput], decodes: list[SeqInput], num_logits: list[int]) -> torch.Tensor:
        """Run one step over prefills (any number of new tokens each) then decodes (one each).

        num_logits[i]: how many trailing positions of sequence i (prefills + decodes order)
        need logits (0: none, 1: the next token, k + 1: speculative verification).
        Returns logits [sum(num_logits), V], in that order."""
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_index: list[int] = []
        prefill_meta: list[PrefillSeq] = []
        short_groups: list[DecodeGroup] = []
        for i, (seq, want) in enumerate(zip(prefills + decodes, num_logits, strict=True)):
            start = len(tokens)
            pos = range(seq.start, seq.start + seq.n)
            tokens.extend(seq.token_ids[seq.start: seq.start + seq.n])
            positions.extend(pos)
            slots.extend(seq.block_ids[p // bs] * bs + p % bs for p in pos)
            logit_index.extend(range(len(tokens) - want, len(tokens)))
            if i >= len(prefills):
                continue
            if seq.n <= SHORT_AS_DECODE and self._decode_kernel:
                short_groups.append(self._rows_group(seq, start))
            else:
                prefill_meta.append(PrefillSeq(
                    query_start=start, query_len=seq.n, context_len=seq.start + seq.n,
                    block_table=torch.tensor(seq.block_ids[: -(-(seq.start + seq.n) // bs)], dtype=torch.long,
                                             device=self.device),
                ))
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            prefills=prefill_meta,
            decodes=short_groups + self._decode_groups(decodes, len(tokens) - len(decodes)),
            sliding_window=self.cfg.sliding_window,
        )
        hidden = self.model(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                            self.kv_cache, meta)
        rows = torch.tensor(logit_index, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden[rows])

    def _rows_group(self, seq: SeqInput, query_start: int) -> DecodeGroup:
        """A few new tokens of one sequence (speculative verification, a draft's tail) as decode
        rows: row i attends to the first seq.start + i + 1 tokens, which is the causal mask."""
        n, table = seq.n, torch.tensor(seq.block_ids, dtype=torch.long, device=self.device)
        return DecodeGroup(
            query_start=query_start,
            block_tables=table[None].expand(n, -1).contiguous(),
            context_lens=torch.arange(seq.start + 1, seq.start + n + 1, device=self.device),
            max_context=seq.start + n,
        )

    def _decode_groups(self, decodes: list[SeqInput], first_token: int) -> list[DecodeGroup]:
        """Split decodes (callers pass them sorted by context length) into groups whose
        padded context stays close to each member's own, so attention reads little padding."""
        groups: list[DecodeGroup] = []
        i = 0
        while i < len(decodes):
            j = i + 1
            # extend while the group's largest context wastes at most ~25% on the smallest
            while (j < len(decodes) and j - i < DECODE_GROUP_MAX
                   and (decodes[i].start + 1) * 5 >= (decodes[j].start + 1) * 4):
                j += 1
            members = decodes[i:j]
            max_blocks = max(len(d.block_ids) for d in members)
            lens = [d.start + 1 for d in members]
            groups.append(DecodeGroup(
                query_start=first_token + i,
                block_tables=torch.tensor([d.block_ids + [0] * (max_blocks - len(d.block_ids)) for d in members],
                                          dtype=torch.long, device=self.device),
                context_lens=torch.tensor(lens, device=self.device),
                max_context=max(lens),
            ))
            i = j
        return groups

    # -- KV export / import (disaggregation) --------------------------------------------
    def gather_kv(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        """-> [num_layers, 2, num_tokens, Hkv, D], contiguous."""
        idx = torch.tensor(block_ids, device=self.device)
        blocks = self.kv_cache[:, :, idx]  # [L, 2, nb, bs, H, D]
        return blocks.flatten(2, 3)[:, :, :num_tokens].contiguous()

    def scatter_kv(self, block_ids: list[int], kv: torch.Tensor, layer_start: int, token_start: int) -> None:
        # kv: [n_layers, 2, T, H, D] -> slots token_start .. token_start + T of the given layers
        bs = self.block_size
        n_layers, _, t = kv.shape[:3]
        pos = torch.arange(token_start, token_start + t)
        slots = torch.tensor(block_ids, dtype=torch.long)[pos // bs] * bs + pos % bs
        flat = self.kv_cache[layer_start: layer_start + n_layers].flatten(2, 3)  # [n, 2, nb*bs, H, D]
        flat[:, :, slots.to(self.device)] = kv.to(device=self.device, dtype=self.dtype)
