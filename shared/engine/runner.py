"""A scheduled batch -> input tensors -> model forward -> logits of the sampled rows.

Owns the device, the model weights and the KV cache tensor
[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] in the model dtype, or, with an
8-bit KV cache, [..., num_kv_heads, head_dim + head_dim / 32] packed bytes (model/kv_quant.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from shared.config import auto_dtype

from . import hugepages
from .cuda_graphs import CudaGraphBackend, DecodeGraphs, GraphBackend, StaticInputs, default_buckets
from .model import (
    AttentionMetadata,
    DecodeGroup,
    GpuBatch,
    LlamaForCausalLM,
    ModelConfig,
    ModelLoadError,
    PrefillSeq,
    cpu_kernels,
    kv_quant,
    load_weights,
    quant,
)
from .model.llama import RMSNorm

DECODE_GROUP_MAX = 32  # sequences per batched decode attention call
# On CPU, a sequence's step of at most this many new tokens attends through the decode kernel,
# one row per token, instead of gathering its whole context for SDPA: verifying k proposals and
# a draft's one- or two-token tails cost about what a decode does, not a prefill chunk.
SHORT_AS_DECODE = 17
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", *kv_quant.FORMATS)  # auto: the model dtype


@dataclass
class SeqInput:
    """One sequence's share of a step: tokens [start, start + n) of `token_ids`."""

    token_ids: list[int]
    start: int
    n: int
    block_ids: list[int]


class ModelRunner:
    def __init__(self, model_dir: str, cfg: ModelConfig, dtype: str, device: str, *,
                 quantization: str = "none", kv_cache_dtype: str = "auto"):
        if dtype == "auto":  # bfloat16 on CUDA, float32 on CPU
            dtype = auto_dtype(device)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        # the cache's storage dtype and the width of one head row: packed 8-bit rows carry their scales
        if kv_cache_dtype == "auto":
            self.kv_dtype, self.kv_head_width = self.dtype, cfg.head_dim
        else:
            if cfg.head_dim % kv_quant.GROUP:  # a start-up configuration error, not a traceback
                raise ModelLoadError(
                    f"an 8-bit KV cache (TANDEM_KV_CACHE_DTYPE={kv_cache_dtype}) needs head_dim divisible by "
                    f"{kv_quant.GROUP}, and this model's is {cfg.head_dim}; use TANDEM_KV_CACHE_DTYPE=auto"
                )
            self.kv_dtype, self.kv_head_width = kv_quant.FORMATS[kv_cache_dtype], kv_quant.packed_width(cfg.head_dim)
        self.kv_cache_dtype = dtype if kv_cache_dtype == "auto" else kv_cache_dtype  # wire name of the KV payload
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg, quantization)
        model = model.to_empty(device=self.device).to(self.dtype)
        if cfg.norm_offset:  # Gemma: 1 + weight kept in float32, as transformers computes it
            for m in model.modules():
                if isinstance(m, RMSNorm):
                    m.float()
        quant.prepare(model, self.dtype)
        model.rotary.inv_freq = cfg.rope_inv_freq().to(self.device)  # buffer was on meta
        if model.local_rotary is not None:
            model.local_rotary.inv_freq = cfg.rope_inv_freq(local=True).to(self.device)
        load_weights(model, model_dir, cfg.tie_word_embeddings, cfg.norm_offset)
        self.model = model.eval()
        self.kv_cache: torch.Tensor | None = None
        self.block_size = 0
        self._decode_kernel = cpu_kernels.supports(self.device, self.dtype)
        # on CUDA, attention runs through the Triton kernels (model/triton_attention.py; they read
        # packed 8-bit rows in place too)
        self._triton = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self._triton else 0
        self.pad_block = 0  # the KV block written by padding rows (see cuda_graphs.py)
        self.graphs: DecodeGraphs | None = None
        self._graph_max_context = 0

    def weight_bytes(self) -> int:
        return quant.quantized_bytes(self.model)

    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.cfg
        return c.num_layers * 2 * block_size * c.num_kv_heads * self.kv_head_width * self.kv_dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """num_blocks for sequences, plus one more: the pad block, which no sequence ever owns."""
        c = self.cfg
        self.block_size = block_size
        self.pad_block = num_blocks
        shape = (c.num_layers, 2, num_blocks + 1, block_size, c.num_kv_heads, self.kv_head_width)
        if self.device.type == "cpu":
            self.kv_cache = hugepages.zeros(shape, self.kv_dtype)
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one KV block's contents (every layer, keys and values) into another block."""
        self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])

    @torch.inference_mode()
    def forward(self, prefills: list[SeqInput], decodes: list[SeqInput], num_logits: list[int]) -> torch.Tensor:
        """Run one step over prefills (any number of new tokens each) then decodes (one each).

        num_logits[i]: how many trailing positions of sequence i (prefills + decodes order)
        need logits (0: none, 1: the next token, k + 1: speculative verification).
        Returns logits [sum(num_logits), V], in that order."""
        if self.graphs is not None and not prefills and decodes:
            hidden = self.graphs.run([d.token_ids[d.start] for d in decodes], [d.start for d in decodes],
                                     [d.block_ids for d in decodes])
            if hidden is not None:
                return self.model.compute_logits(hidden)
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
            if i >= len(prefills) or self._triton:
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
            decodes=[] if self._triton else short_groups + self._decode_groups(decodes, len(tokens) - len(decodes)),
            sliding_window=self.cfg.sliding_window,
            gpu=self._gpu_batch(prefills, decodes) if self._triton else None,
        )
        hidden = self.model(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                            self.kv_cache, meta)
        rows = torch.tensor(logit_index, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden[rows])

    def _gpu_batch(self, prefills: list[SeqInput], decodes: list[SeqInput]) -> GpuBatch:
        """Index tensors of the Triton kernels: one varlen launch for the prefills (and
        verifications), one split-K launch for the decodes."""
        bs, dev = self.block_size, self.device

        def table(seqs: list[SeqInput], lens: list[int]) -> torch.Tensor:
            rows = [s.block_ids[: -(-n // bs)] for s, n in zip(seqs, lens, strict=True)]
            width = max(len(r) for r in rows)
            return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=dev)

        g = GpuBatch(num_prefill_tokens=sum(p.n for p in prefills))
        if prefills:
            lens = [p.start + p.n for p in prefills]
            cu = [0]
            for p in prefills:
                cu.append(cu[-1] + p.n)
            g.cu_q_lens = torch.tensor(cu, dtype=torch.int32, device=dev)
            g.prefill_context_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            g.prefill_block_tables = table(prefills, lens)
            g.max_q_len = max(p.n for p in prefills)
        if decodes:
            lens = [d.start + 1 for d in decodes]
            g.decode_context_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            g.decode_block_tables = table(decodes, lens)
            g.num_splits = self._num_splits(len(decodes), max(lens))
        return g

    def _num_splits(self, batch: int, max_context: int) -> int:
        from .model.attention import DECODE_BLOCK_N
        from .model.triton_attention import default_num_splits

        return default_num_splits(batch, self.cfg.num_kv_heads, max_context, self._num_sms, DECODE_BLOCK_N)

    # -- CUDA graphs for decode steps ---------------------------------------------------------
    def enable_decode_graphs(self, max_batch: int, max_model_len: int, backend: GraphBackend | None = None,
                             buckets: list[int] | None = None) -> DecodeGraphs:
        """Capture the decode forward per batch-size bucket (after allocate_kv_cache). backend:
        CUDA graphs by default; tests pass one that replays eagerly, to run the same bookkeeping on CPU."""
        if self.kv_cache is None:
            raise RuntimeError("allocate the KV cache before capturing graphs")
        self._graph_max_context = max_model_len
        self.graphs = DecodeGraphs(
            self._graph_forward, max_blocks=-(-max_model_len // self.block_size) + 1, block_size=self.block_size,
            pad_block=self.pad_block, device=self.device,
            index_dtype=torch.int32 if self._triton else torch.long,  # the C++ kernel reads int64
            backend=backend or CudaGraphBackend(self.device), buckets=buckets or default_buckets(max_batch),
        )
        with torch.inference_mode():
            self.graphs.capture()
        return self.graphs

    def _graph_forward(self, s: StaticInputs) -> torch.Tensor:
        """The decode forward over static buffers (no tensor built here, no length read on the host)."""
        n = s.input_ids.shape[0]
        if self._triton:
            # splits fixed for the bucket: sized for the longest context any step may bring
            gpu = GpuBatch(num_prefill_tokens=0, decode_block_tables=s.block_tables, decode_context_lens=s.context_lens,
                           num_splits=self._num_splits(n, self._graph_max_context))
            meta = AttentionMetadata(s.slot_mapping, [], [], self.cfg.sliding_window, gpu=gpu)
        else:
            group = DecodeGroup(0, s.block_tables, s.context_lens, s.block_tables.shape[1] * self.block_size)
            meta = AttentionMetadata(s.slot_mapping, [], [group], self.cfg.sliding_window)
        return self.model(s.input_ids, s.positions, self.kv_cache, meta)

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
        """-> [num_layers, 2, num_tokens, Hkv, W] in the cache's dtype (packed rows as they are), contiguous."""
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
        if kv.dtype != self.kv_dtype and (kv_quant.is_packed(kv.dtype) or kv_quant.is_packed(self.kv_dtype)):
            raise ValueError(f"KV of dtype {kv.dtype} cannot go into a {self.kv_cache_dtype} cache")
        flat[:, :, slots.to(self.device)] = kv.to(device=self.device, dtype=self.kv_dtype)
