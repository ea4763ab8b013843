"""Span attribute names used across Tandem, so that every service spells them the same way.

Tandem's own attributes are `tandem.<name>`; `span(name, request_id=...)` and
`annotate(...)` in `tracing.py` turn a keyword `foo` into `tandem.foo`, so the constants
below and the keywords agree by construction. gRPC spans use the OpenTelemetry `rpc.*`
semantic conventions.
"""

PREFIX = "tandem."

# Request
REQUEST_ID = "tandem.request_id"
PROMPT_TOKENS = "tandem.prompt_tokens"
CACHED_TOKENS = "tandem.cached_tokens"
COMPLETION_TOKENS = "tandem.completion_tokens"
FINISH_REASON = "tandem.finish_reason"
MODEL = "tandem.model"

# Routing (scheduler)
DECODE_WORKER = "tandem.decode_worker"
PREFILL_WORKER = "tandem.prefill_worker"
DISAGGREGATED = "tandem.disaggregated"

# KV transfer
KV_BYTES = "tandem.kv_bytes"
KV_BLOCKS = "tandem.kv_blocks"
KV_TRANSPORT = "tandem.kv_transport"
KV_SECONDS = "tandem.kv_seconds"

# Speculative decoding
SPEC_PROPOSED = "tandem.spec_proposed"
SPEC_ACCEPTED = "tandem.spec_accepted"

# gRPC (OpenTelemetry semantic conventions)
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
NET_PEER = "net.peer.name"


def tandem_attribute(key: str) -> str:
    """`request_id` -> `tandem.request_id`; a name that already has a dot is kept as it is."""
    return key if "." in key else PREFIX + key
