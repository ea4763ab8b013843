"""KV transport between processes: checksummed chunks for a gRPC stream, and
torch.distributed send/recv (gloo on CPU, nccl on CUDA) on one group per pair.

A payload is `[num_layers, 2, num_tokens, num_kv_heads, head_dim]` (k=0, v=1) in
float32 / bfloat16 / float16, or packed 8-bit rows ("fp8" / "int8"). This package knows neither protobuf (the services copy
`KvChunk` and `TransferMeta` fields into their messages) nor the engine (the services
hand it tensors from `export_kv` and give what arrives to `import_kv`).
"""

from shared.kv.chunks import DEFAULT_MAX_CHUNK_BYTES, KvAssembler, KvChunk, KvPiece, assemble_kv, split_kv
from shared.kv.collective import CollectiveKvSender, KvSenderPool, PendingSend, TransferMeta
from shared.kv.collective_receiver import CollectiveKvReceiver
from shared.kv.errors import (
    KvChecksumError,
    KvDuplicateChunk,
    KvShapeMismatch,
    KvTransferError,
    KvTransferTimeout,
)

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "CollectiveKvReceiver",
    "CollectiveKvSender",
    "KvAssembler",
    "KvChecksumError",
    "KvChunk",
    "KvDuplicateChunk",
    "KvPiece",
    "KvSenderPool",
    "KvShapeMismatch",
    "KvTransferError",
    "KvTransferTimeout",
    "PendingSend",
    "TransferMeta",
    "assemble_kv",
    "split_kv",
]
