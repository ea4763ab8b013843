"""Build the scheduler from its config; start and stop it (used by __main__ and by tests)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.common.api_keys import ApiKeyInterceptor, ApiKeys
from services.common.errors import ErrorInterceptor
from services.common.server import GrpcServer
from services.common.telemetry import quiet_telemetry, traced_server_interceptors
from services.common.tls import Tls
from shared.config import ConfigError, SchedulerConfig
from shared.pb.tandem.v1 import generate_pb2, worker_pb2, worker_pb2_grpc
from shared.telemetry import Telemetry
from shared.text import Tokenizer

from .frontend import Frontend
from .http import ChatTemplate, HttpServer, build_http_app, reasoning, tool_parsers
from .http.chat import TemplateError
from .pool import WorkerPool
from .router import Router
from .servicer import SchedulerServicer, TandemServicer, add_tandem_servicer

log = logging.getLogger(__name__)

TANDEM_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Tandem"].full_name


class SchedulerApp:
    def __init__(self, config: SchedulerConfig, *, telemetry: Telemetry | None = None):
        self.config = config
        self.telemetry = telemetry if telemetry is not None else quiet_telemetry("tandem-scheduler")
        model_dir = Path(config.model)
        if not model_dir.is_dir():
            raise ConfigError(f"TANDEM_MODEL: {model_dir} is not a directory")
        self.model_name = config.model_name or model_dir.resolve().name
        try:
            self.tokenizer = Tokenizer.from_dir(model_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"TANDEM_MODEL: {e}") from None
        self.tls = Tls.from_config(config)
        self.tls.log_mode("scheduler", public=True)
        self.api_keys = None
        if config.api_keys_file:
            self.api_keys = ApiKeys(config.api_keys_file, max_concurrency=config.api_key_max_concurrency)
        else:
            log.warning(
                "scheduler: API keys are OFF (no TANDEM_API_KEYS_FILE): anyone who reaches the port can generate"
            )
        self.pool = WorkerPool(
            interval_s=config.health_interval_s,
            prefix_memory_blocks=config.prefix_memory_blocks,
            expiry_s=config.worker_expiry_s,
            interceptors=self.telemetry.client_interceptors(),
            tls=self.tls,
        )
        self.router = Router(self.pool, disagg_min_tokens=config.disagg_min_tokens)
        self.frontend = Frontend(
            self.tokenizer,
            self.pool,
            self.router,
            self.telemetry,
            default_max_tokens=config.default_max_tokens,
            max_stop_strings=config.max_stop_strings,
            max_inflight_per_decode=config.max_inflight_per_decode,
            max_queued_requests=config.max_queued_requests,
            max_queued_tokens=config.max_queued_tokens,
            max_migrations=config.max_migrations,
        )
        self.server = GrpcServer(
            host=config.host,
            port=config.port,
            advertise_address=config.advertise_address,
            tls=self.tls,
            public=True,
            internal_port=config.internal_port,
            service_names=[
                TANDEM_SERVICE,
                worker_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
            ],
            interceptors=[
                *traced_server_interceptors(self.telemetry),
                *([ApiKeyInterceptor(self.api_keys)] if self.api_keys is not None else []),
                ErrorInterceptor(),
            ],
            # the transport takes up to 4x the limit, so that a request over it is read and
            # refused with INVALID_ARGUMENT naming the limit, not RESOURCE_EXHAUSTED ("retry later")
            max_receive_bytes=4 * config.max_request_bytes,
        )
        add_tandem_servicer(
            TandemServicer(
                self.frontend,
                self.pool,
                model_name=self.model_name,
                vocab_size=self.tokenizer.vocab_size,
                eos_token_ids=self.tokenizer.eos_token_ids,
            ),
            self.server.grpc_server,
            max_request_bytes=config.max_request_bytes,
        )
        worker_pb2_grpc.add_SchedulerServicer_to_server(
            SchedulerServicer(self.pool, model_name=self.model_name, require_peer_cert=self.tls.mutual),
            self.server.grpc_server,
        )
        self.http: HttpServer | None = None
        if config.http_port:
            try:
                self.chat_template = ChatTemplate.from_dir(model_dir)
            except TemplateError as e:
                raise ConfigError(f"TANDEM_MODEL: {e}") from None
            template_source = self.chat_template.source if self.chat_template else None
            self.http = HttpServer(
                build_http_app(
                    self.frontend,
                    self.pool,
                    self.tokenizer,
                    self.telemetry,
                    model_name=self.model_name,
                    chat_template=self.chat_template,
                    tool_parser=tool_parsers.choose(config.tool_call_parser, template_source),
                    reasoning=reasoning.choose(config.reasoning_parser, template_source),
                    api_keys=self.api_keys,
                ),
                host=config.host,
                port=config.http_port,
                grace_period_s=config.grace_period_s,
                tls_cert=config.tls_cert,
                tls_key=config.tls_key,
            )

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> int:
        for addr in self.config.decode_addrs:
            self.pool.add(addr, "decode")
        for addr in self.config.prefill_addrs:
            self.pool.add(addr, "prefill")
        self.pool.start()
        # The Tandem service's health (what a Kubernetes readiness probe asks) turns SERVING once
        # a decode worker is healthy, so that a new scheduler gets no clients before its workers
        # have registered; the server's own health ("") is SERVING from the start.
        self.pool.on_healthy.append(self._worker_healthy)
        port = await self.server.start(hold=[] if self.pool.healthy("decode") else [TANDEM_SERVICE])
        if self.http is not None:
            try:
                await self.http.start()
            except OSError as e:
                await self.server.stop(0)
                await self.pool.close()
                raise ConfigError(str(e)) from None
        return port

    def _worker_healthy(self, worker) -> None:
        if worker.role == "decode":
            asyncio.ensure_future(self.server.set_serving(TANDEM_SERVICE, True))

    async def stop(self, grace_s: float | None = None) -> None:
        grace_s = self.config.grace_period_s if grace_s is None else grace_s
        # both fronts stop accepting at once, and share the grace period
        await asyncio.gather(
            self.server.stop(grace_s), *([self.http.stop(grace_s)] if self.http is not None else [])
        )
        await self.pool.close()
        self.frontend.close()
        await asyncio.to_thread(self.telemetry.shutdown)  # flushes buffered spans
