"""gRPC servicers of the scheduler: protobuf in, domain (Frontend, WorkerPool) out, and back."""

from __future__ import annotations

import logging

import grpc

from services.common.tls import peer_certificate
from shared.pb.tandem.v1 import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc

from .frontend import Frontend, Piece
from .pool import WorkerPool
from .validation import MalformedRequest, request_parser

log = logging.getLogger(__name__)


def piece_to_pb(piece: Piece) -> generate_pb2.GenerateResponse:
    return generate_pb2.GenerateResponse(
        request_id=piece.request_id,
        text=piece.text,
        token_ids=piece.token_ids,
        logprobs=piece.logprobs,
        prompt_logprobs=piece.prompt_logprobs,
        finish_reason=piece.finish_reason,
        finish_message=piece.finish_message,
        usage=piece.usage,
    )


class TandemServicer(generate_pb2_grpc.TandemServicer):
    """The public API."""

    def __init__(
        self, frontend: Frontend, pool: WorkerPool, *, model_name: str, vocab_size: int, eos_token_ids
    ):
        self._frontend = frontend
        self._pool = pool
        self._model_name = model_name
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)

    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        if isinstance(request, MalformedRequest):  # see parse_generate_request
            raise request.error()
        job = await self._frontend.prepare(request)
        async for piece in self._frontend.generate(job, timeout_s=context.time_remaining()):
            yield piece_to_pb(piece)

    async def GetModelInfo(self, request, context) -> generate_pb2.ModelInfo:
        await self._pool.refresh()  # the load as it is now, not as of the last poll
        workers = list(self._pool.workers.values())
        infos = [w.info for w in workers if w.info is not None]
        return generate_pb2.ModelInfo(
            model_name=self._model_name,
            max_model_len=min((i.max_model_len for i in infos if i.role == "decode"), default=0),
            engine=infos[0].engine if infos else "",
            vocab_size=self._vocab_size,
            eos_token_ids=self._eos_token_ids,
            workers=[
                generate_pb2.WorkerStatus(
                    address=w.address,
                    role=w.role,
                    healthy=w.healthy,
                    num_free_blocks=w.load.num_free_blocks,
                    num_total_blocks=w.load.num_total_blocks,
                    num_running=w.load.num_running,
                    num_waiting=w.load.num_waiting,
                    registered=w.registered,
                )
                for w in workers
            ],
        )


def add_tandem_servicer(servicer: TandemServicer, server: grpc.aio.Server, *, max_request_bytes: int) -> None:
    """generate_pb2_grpc.add_TandemServicer_to_server, with a Generate deserializer that lets a
    request with invalid UTF-8, or one over `max_request_bytes`, reach the servicer (and be
    answered INVALID_ARGUMENT naming the field or the limit)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=request_parser(max_request_bytes),
            response_serializer=generate_pb2.GenerateResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=generate_pb2.GetModelInfoRequest.FromString,
            response_serializer=generate_pb2.ModelInfo.SerializeToString,
        ),
    }
    name = generate_pb2.DESCRIPTOR.services_by_name["Tandem"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class SchedulerServicer(worker_pb2_grpc.SchedulerServicer):
    """Self-registration of workers.

    With mutual TLS (`require_peer_cert`), only a peer that presented a certificate signed by the
    cluster CA registers: the internal port asks for one, the public port does not, so a call
    over the public port is refused. No registration replaces a healthy worker of another role at
    the same address (a restarted worker registers once its old self failed its health check)."""

    def __init__(self, pool: WorkerPool, *, model_name: str, require_peer_cert: bool = False):
        self._pool = pool
        self._model_name = model_name
        self._require_peer_cert = require_peer_cert

    async def RegisterWorker(
        self, request: worker_pb2.RegisterWorkerRequest, context
    ) -> worker_pb2.RegisterWorkerResponse:
        peer = peer_certificate(context)
        if self._require_peer_cert and peer is None:
            log.warning(
                "refused a registration of %r from %s: no client certificate", request.address, context.peer()
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "worker registration needs a client certificate signed by the cluster CA (the scheduler's internal port)",
            )
        if request.role not in ("prefill", "decode"):
            return worker_pb2.RegisterWorkerResponse(
                accepted=False, message=f"role must be prefill or decode, got {request.role!r}"
            )
        if request.model_name and request.model_name != self._model_name:
            return worker_pb2.RegisterWorkerResponse(
                accepted=False,
                message=f"worker serves {request.model_name!r}, the scheduler {self._model_name!r}",
            )
        host, sep, port = request.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            return worker_pb2.RegisterWorkerResponse(
                accepted=False, message=f"address must be host:port, got {request.address!r}"
            )
        existing = self._pool.workers.get(request.address)
        if existing is not None and existing.healthy and existing.role != request.role:
            log.warning(
                "refused a registration of %s as %s (certificate %s): a healthy %s worker is there",
                request.address,
                request.role,
                peer,
                existing.role,
            )
            return worker_pb2.RegisterWorkerResponse(
                accepted=False,
                message=f"{request.address} is a healthy {existing.role} worker; a registration cannot replace it",
            )
        self._pool.add(request.address, request.role, registered=True)
        log.info("registered %s worker %s (certificate %s)", request.role, request.address, peer or "none")
        return worker_pb2.RegisterWorkerResponse(accepted=True)
