"""`wisp-server`: loads the target, starts the scheduler and serves gRPC until told to stop."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wisp_common import __version__
from wisp_common.config import (
    ServerConfig,
    add_config_arguments,
    config_from_args,
    grpc_message_options,
    keepalive_options,
)
from wisp_common.models import hardware_name, resolve_device, resolve_dtype
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import RETRY_AFTER_KEY, SERVER_LOADING_KEY
from wisp_common.systemd import notify
from wisp_server.auth import access_interceptors, listen
from wisp_server.engines.base import VerificationEngine
from wisp_server.engines.factory import build_engine, engine_kind
from wisp_server.estimator import VerificationTimeEstimator, fit_path, profile
from wisp_server.metrics import ServerMetrics
from wisp_server.ngram import NgramSpeculation
from wisp_server.scheduler import POLICIES, BatchLimits, BatchScheduler, SchedulingPolicy, SLEDPolicy, WispPolicy
from wisp_server.service import WispService, tolerant

log = logging.getLogger("wisp_server")


def make_policy(config: ServerConfig, estimator: VerificationTimeEstimator) -> SchedulingPolicy:
    limits = BatchLimits(config.max_batch_sessions, config.max_batch_tokens)
    if config.policy == "sled":
        return SLEDPolicy(limits, estimator, window=config.sled_window)
    if config.policy == "wisp":
        return WispPolicy(limits, estimator, urgency=config.wisp_urgency, max_wait=config.wisp_max_wait)
    return POLICIES[config.policy](limits, estimator)


def estimator_identity(config: ServerConfig, engine: VerificationEngine) -> dict[str, str | int]:
    """What a verification step's cost depends on: a saved estimator fit is reused only where all of it matches."""
    import torch
    import transformers

    device = resolve_device(config.device)
    return {
        "engine": type(engine).__name__,
        "settings": engine.cost_settings,  # vLLM's release and engine arguments: batch limits, parallelism, ...
        "target": engine.info.target_fingerprint or engine.info.model_name,
        "dtype": resolve_dtype(config.dtype, device),
        "hardware": hardware_name(device),
        "threads": config.threads,
        "software": f"wisp {__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
    }


WISP_SERVICE = pb.DESCRIPTOR.services_by_name["Wisp"]
LOADING = "the server is loading its target model; retry once its health check says SERVING"


class _WispCalls(grpc.GenericRpcHandler):
    """The Wisp service's calls: UNAVAILABLE while the target loads, then the service's own handlers.

    The gRPC server starts before the engine exists (a large target loads for minutes), so health checks can
    answer NOT_SERVING meanwhile; a generic handler is the one kind gRPC lets a started server take on later.
    """

    def __init__(self, retry_after_ms: int) -> None:
        self._handlers: grpc.GenericRpcHandler | None = None
        self._retry_after_ms = retry_after_ms

    def attach(self, service: WispService) -> None:
        collected = _Collected()
        pb_grpc.add_WispServicer_to_server(service, collected)
        self._handlers = collected.handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if self._handlers is not None:
            handler = self._handlers.service(handler_call_details)
            return None if handler is None else _tolerant(handler)
        prefix = f"/{WISP_SERVICE.full_name}/"
        method = handler_call_details.method
        if not method.startswith(prefix) or method[len(prefix) :] not in WISP_SERVICE.methods_by_name:
            return None
        return _unavailable(WISP_SERVICE.methods_by_name[method[len(prefix) :]], self._retry_after_ms)


class _Collected:
    """Stands in for a gRPC server to catch the handlers the generated code registers."""

    handlers: grpc.GenericRpcHandler

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        (self.handlers,) = handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        pass  # the same handlers as the generic one


def _tolerant(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that hands the service a malformed request rather than failing the call."""
    kind = (handler.request_streaming, handler.response_streaming)
    make, behavior = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }[kind]
    return make(behavior, tolerant(handler.request_deserializer), handler.response_serializer)


def _unavailable(method: MethodDescriptor, retry_after_ms: int) -> grpc.RpcMethodHandler:
    """A handler of the method's kind that refuses the call with UNAVAILABLE, saying the server is loading: edges
    retry after the hint without counting it as a failure."""

    def refuse(request, context: grpc.ServicerContext):
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(retry_after_ms)), (SERVER_LOADING_KEY, "1")))
        context.abort(grpc.StatusCode.UNAVAILABLE, LOADING)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    return kinds[method.client_streaming, method.server_streaming](refuse)


class WispServer:
    """The gRPC server, the engine and the scheduler, started and stopped together.

    The gRPC server (health NOT_SERVING, every Wisp call UNAVAILABLE) and the metrics port (`/health` 503) come
    up first; `serve` then takes the engine once it is built, and health turns SERVING. Given the engine up
    front, `start` does both.
    """

    def __init__(self, config: ServerConfig, engine: VerificationEngine | None = None):
        self.config = config
        self.metrics = ServerMetrics(config.target_model, config.policy)
        self.estimator: VerificationTimeEstimator | None = None
        self.scheduler: BatchScheduler | None = None
        self.service: WispService | None = None
        self._engine = engine
        self._fit_file: tuple[Path, dict[str, str | int]] | None = None  # where the estimator's fit is kept
        self._serving = False
        self.metrics.serving.set_function(lambda: float(self._serving))
        # Set when the server should stop: a signal, or an engine that died (then `fatal` says why).
        self.stopping = threading.Event()
        self.fatal: BaseException | None = None
        self.metrics_port: int | None = None
        # One thread per open stream: handlers block while their round is verified. Calls beyond the threads are
        # refused (RESOURCE_EXHAUSTED) rather than queued, so sustained overload cannot grow memory.
        workers = config.max_sessions + 8
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=[
                *keepalive_options(config.keepalive_seconds, config.keepalive_timeout, server=True),
                *grpc_message_options(config.grpc_max_message_bytes),
            ],
            maximum_concurrent_rpcs=workers,
            interceptors=access_interceptors(config, self.metrics),  # tokens and rate limits, before any work
        )
        self._wisp = _WispCalls(config.retry_after_ms)
        self._grpc.add_generic_rpc_handlers((self._wisp,))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self._report_health()
        services = (WISP_SERVICE.full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self._grpc)
        self.port = listen(self._grpc, config)  # TLS where configured
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.host}:{config.port}")

    def start(self) -> None:
        """Serves health (NOT_SERVING), metrics and gRPC; and the engine's rounds, if it was given."""
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port, lambda: self._serving)
        self._grpc.start()
        if self._engine is not None:
            self.serve(self._engine)

    def serve(self, engine: VerificationEngine) -> None:
        """Seeds the estimator on ``engine``, starts the scheduler and the Wisp service, and reports SERVING."""
        config = self.config
        self.estimator = VerificationTimeEstimator(padded=engine.pads_batches)
        if config.profile_estimator and engine.verifies_any_prompt:  # else it learns from the first batches
            self._seed_estimator(engine)
        self.scheduler = BatchScheduler(
            engine, make_policy(config, self.estimator), self.estimator, self.metrics, on_fatal=self._engine_died
        )
        self.service = WispService(config, engine, self.scheduler)
        self.scheduler.start()
        self._wisp.attach(self.service)
        self._serving = True
        self._report_health()

    def _seed_estimator(self, engine: VerificationEngine) -> None:
        """Starts the estimator from the fit the last server on this engine, target and hardware saved
        (`--estimator-cache`), else from a start-up profile (then saved); at stop it is saved again, with what this
        run learnt."""
        config, estimator = self.config, self.estimator
        identity = estimator_identity(config, engine)
        path = None if config.estimator_cache == "none" else fit_path(config.estimator_cache, identity)
        self._fit_file = None if path is None else (path, identity)
        if path is not None and estimator.load(path, identity):
            log.info(
                "verification time estimator: starting from the fit saved in %s (%d batches; --estimator-cache none "
                "profiles anew)",
                path,
                estimator.observations,
            )
        else:
            started = time.monotonic()
            batch_sessions = min(config.max_batch_sessions, config.max_sessions)
            profile(engine, estimator, batch_sessions, config.max_context_tokens, config.max_draft_tokens)
            log.info(
                "verification time estimator profiled in %.1fs: MAPE %.1f%% over %d batches",
                time.monotonic() - started,
                estimator.mape or 0.0,
                estimator.observations,
            )
            self._save_fit()

    def _save_fit(self) -> None:
        """Saves the estimator's fit where `_seed_estimator` found none, or took it from."""
        if self._fit_file is None or self.estimator is None:
            return
        try:
            self.estimator.save(*self._fit_file)
        except OSError as error:  # a read-only home: the next start profiles, nothing worse
            log.warning("cannot save the estimator's fit to %s: %s", self._fit_file[0], error)

    @property
    def serving(self) -> bool:
        return self._serving

    def mark_not_serving(self, reason: str) -> None:
        """Health turns NOT_SERVING (gRPC and `/health`) for good, e.g. after a fatal engine failure, so load
        balancers and probes take this server out while it drains or a supervisor restarts it."""
        log.error("not serving: %s", reason)
        self._serving = False
        self._report_health()

    def _report_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self._serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", WISP_SERVICE.full_name):  # the server as a whole, and the Wisp service by name
            self._health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Graceful: admits nothing more, lets rounds in flight finish for up to ``grace`` seconds (default
        `shutdown_grace`) and tells every session UNAVAILABLE, so its edge resumes elsewhere."""
        self._serving = False
        self._health.enter_graceful_shutdown()
        if self.service is not None:
            self.service.drain(self.config.shutdown_grace if grace is None else grace)
        if self.scheduler is not None:
            self.scheduler.stop()  # rounds still waiting fail UNAVAILABLE too
        self._save_fit()
        self._grpc.stop(1.0).wait()
        self.metrics.close()

    def _engine_died(self, error: BaseException) -> None:
        """The engine cannot verify anymore: report NOT_SERVING and stop, so a supervisor restarts the process."""
        self.fatal = error
        self.mark_not_serving(f"the engine failed: {error}")
        self.stopping.set()

    def wait(self) -> None:
        self._grpc.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wisp-server",
        description="WISP verification server: verifies edge drafts against the target model.",
    )
    add_config_arguments(parser, ServerConfig)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(ServerConfig, args)
    try:
        NgramSpeculation.parse(config.generate_speculation)
    except ValueError as error:
        parser.error(str(error))

    started = time.monotonic()
    server = WispServer(config)
    server.start()  # health says NOT_SERVING while the target loads
    device = resolve_device(config.device)
    log.info(
        "loading target %s (%s engine, %s, %s); gRPC on %s:%d is NOT_SERVING until it is ready",
        config.target_model,
        engine_kind(config.engine),
        resolve_dtype(config.dtype, device),
        device,
        config.host,
        server.port,
    )
    try:
        engine = build_engine(config)
    except BaseException:
        server.stop(grace=0)
        raise
    server.serve(engine)
    # Before the server says it is ready, so a stop sent on that news finds them. A handler only notes the
    # signal: one that set `stopping` itself could run while this thread holds that Event's lock, on its way out
    # of wait() after an earlier signal, and deadlock (Ctrl-C pressed twice).
    signalled: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _: signalled.append(number))
    # Scripts and tests wait for this line; with --port 0 it is the only way to learn the port.
    metrics = f"metrics on :{server.metrics_port}/metrics, " if server.metrics_port else ""
    print(
        f"WISP server listening on {config.host}:{server.port} ({metrics}ready in {time.monotonic() - started:.1f}s)",
        flush=True,
    )
    notify("READY=1")  # systemd Type=notify
    while not signalled and not server.stopping.wait(0.2):
        pass
    notify("STOPPING=1")
    if server.fatal is not None:
        log.critical("exiting: the engine failed and cannot recover (%s)", server.fatal)
        server.stop(grace=0)
        return 1
    log.info("shutting down: finishing in-flight rounds")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
