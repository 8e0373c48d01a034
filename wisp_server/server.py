"""`wisp-server`: loads the target, starts the scheduler and serves gRPC until told to stop."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wisp_common.config import ServerConfig, add_config_arguments, config_from_args
from wisp_common.models import resolve_device, resolve_dtype
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_server.engines.base import VerificationEngine
from wisp_server.engines.factory import build_engine, engine_kind
from wisp_server.estimator import VerificationTimeEstimator, profile
from wisp_server.metrics import ServerMetrics
from wisp_server.scheduler import POLICIES, BatchLimits, BatchScheduler, SchedulingPolicy, SLEDPolicy, WispPolicy
from wisp_server.service import WispService

log = logging.getLogger("wisp_server")


def make_policy(config: ServerConfig, estimator: VerificationTimeEstimator) -> SchedulingPolicy:
    limits = BatchLimits(config.max_batch_sessions, config.max_batch_tokens)
    if config.policy == "sled":
        return SLEDPolicy(limits, estimator, window=config.sled_window)
    if config.policy == "wisp":
        return WispPolicy(limits, estimator, urgency=config.wisp_urgency, max_wait=config.wisp_max_wait)
    return POLICIES[config.policy](limits, estimator)


class WispServer:
    """The engine, the scheduler and the gRPC server, started and stopped together."""

    def __init__(self, config: ServerConfig, engine: VerificationEngine):
        self.config = config
        self.estimator = VerificationTimeEstimator(padded=engine.pads_batches)
        if config.profile_estimator and engine.verifies_any_prompt:  # else it learns from the first batches
            started = time.monotonic()
            batch_sessions = min(config.max_batch_sessions, config.max_sessions)
            profile(engine, self.estimator, batch_sessions, config.max_context_tokens, config.max_draft_tokens)
            log.info(
                "verification time estimator profiled in %.1fs: MAPE %.1f%% over %d batches",
                time.monotonic() - started,
                self.estimator.mape or 0.0,
                self.estimator.observations,
            )
        self.metrics = ServerMetrics()
        self.scheduler = BatchScheduler(engine, make_policy(config, self.estimator), self.estimator, self.metrics)
        self.metrics_port: int | None = None
        # One thread per open stream: handlers block while their round is verified.
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_sessions + 8))
        pb_grpc.add_WispServicer_to_server(WispService(config, engine, self.scheduler), self._grpc)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        services = (pb.DESCRIPTOR.services_by_name["Wisp"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self._grpc)
        self.port = self._grpc.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.host}:{config.port}")

    def start(self) -> None:
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
        self.scheduler.start()
        self._grpc.start()
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 5.0) -> None:
        self._health.enter_graceful_shutdown()
        self._grpc.stop(grace).wait()
        self.scheduler.stop()

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

    started = time.monotonic()
    device = resolve_device(config.device)
    log.info(
        "loading target %s (%s engine, %s, %s)",
        config.target_model,
        engine_kind(config.engine),
        resolve_dtype(config.dtype, device),
        device,
    )
    server = WispServer(config, build_engine(config))
    server.start()
    # Scripts and tests wait for this line; with --port 0 it is the only way to learn the port.
    metrics = f"metrics on :{server.metrics_port}/metrics, " if server.metrics_port else ""
    print(
        f"WISP server listening on {config.host}:{server.port} ({metrics}ready in {time.monotonic() - started:.1f}s)",
        flush=True,
    )

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: finishing in-flight rounds")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
