"""Who may use the server, as whom, and how often: TLS, per-device bearer tokens and per-device rate limits.

Everything here runs before the service does any work. `AccessInterceptor` reads the call's
``authorization: Bearer <token>`` metadata and refuses an unknown or missing token with UNAUTHENTICATED before
the handler starts, so a stranger costs the server no session, no engine state and no scheduler entry. A token
belongs to one device: a Speculate stream may open a session only as that device (else PERMISSION_DENIED). There
is no server-side session to take over: a resumed session is a new stream whose OpenSession carries the tokens
already committed, and it passes exactly the same check as a fresh one, so only the device's own token resumes
it. Health checks stay open (load balancers and Kubernetes probes carry no token); every other call, reflection
and GetServerInfo included, needs one once a tokens file is configured.

Rate limits are token buckets per device (`wisp_server.rate_limit`): sessions per minute (Speculate and
Generate) and draft rounds per second over all of a device's sessions. Over the limit the call ends with
RESOURCE_EXHAUSTED and trailing metadata ``retry-after-ms``. The device is the token's; without tokens it is the
OpenSession's claimed device id (or the peer's address), which a client can change at will.

Secrets never reach logs or metrics: a token is logged only as the first 8 hex digits of its SHA-256.
"""

from __future__ import annotations

import hashlib
import logging
import math
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from wisp_common.config import ServerConfig, is_loopback
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.request import RETRY_AFTER_KEY
from wisp_server.metrics import ServerMetrics
from wisp_server.rate_limit import DeviceRateLimit

log = logging.getLogger(__name__)

OPEN_TO_ALL = "/grpc.health.v1.Health/"
SPECULATE = "/wisp.v1.Wisp/Speculate"
GENERATE = "/wisp.v1.Wisp/Generate"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
MIN_TOKEN_CHARS = 16


def token_digest(token: str) -> str:
    """What logs may say about a token: enough to tell two apart, nothing to use."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class DeviceTokens:
    """The tokens file: one ``device_id token`` line per token (``#`` starts a comment).

    A device may have several lines, so a new token can be rolled out before the old one is removed. Only
    SHA-256 digests are kept, and a lookup compares digests, so its time says nothing about the token.
    """

    def __init__(self, devices_by_digest: dict[bytes, str]):
        self._devices = devices_by_digest

    @classmethod
    def load(cls, path: str | Path) -> DeviceTokens:
        path = Path(path)
        devices: dict[bytes, str] = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) != 2:
                raise ValueError(f"{path}:{number}: expected 'device_id token', got {len(words)} words")
            device, token = words
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(
                    f"{path}:{number}: the token of device {device!r} is shorter than {MIN_TOKEN_CHARS} characters; "
                    "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            digest = hashlib.sha256(token.encode()).digest()
            if devices.setdefault(digest, device) != device:
                raise ValueError(f"{path}:{number}: one token for two devices, {devices[digest]!r} and {device!r}")
        if not devices:
            raise ValueError(f"{path}: no tokens; every call would be refused")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s can be read by other users than its owner; chmod 600 it", path)
        log.info("%d device tokens for %d devices from %s", len(devices), len(set(devices.values())), path)
        return cls(devices)

    def device_of(self, token: str) -> str | None:
        return self._devices.get(hashlib.sha256(token.encode()).digest())


class Refusal(grpc.RpcError):
    """A request refused for who sent it or how often; ``retry_after_ms`` where waiting helps.

    Raised into the service's request stream, which the service may read on a thread of its own where the call
    cannot be ended: to the service the stream ended under it, and `AccessInterceptor` then ends the call with
    this status from the handler's thread.
    """

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after_ms = code, message, retry_after_ms


class AccessInterceptor(grpc.ServerInterceptor):
    """Checks every call's token, binds sessions to the token's device and applies the per-device rate limits."""

    def __init__(
        self,
        tokens: DeviceTokens | None,
        sessions: DeviceRateLimit | None,
        rounds: DeviceRateLimit | None,
        metrics: ServerMetrics,
    ):
        self.tokens = tokens
        self.sessions = sessions
        self.rounds = rounds
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_TO_ALL):
            return handler
        device = None
        if self.tokens is not None:
            device, problem = self._authenticate(handler_call_details.invocation_metadata)
            if device is None:
                return _refusing(handler, lambda context: self._refuse(context, Refusal(UNAUTHENTICATED, problem)))
        if method == SPECULATE:
            return grpc.stream_stream_rpc_method_handler(
                self._checked_speculate(handler.stream_stream, device),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if method == GENERATE and self.sessions is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._checked_generate(handler.unary_stream, device),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _authenticate(self, metadata) -> tuple[str | None, str]:
        """The token's device, or None and why not (never quoting the token)."""
        assert self.tokens is not None
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            return None, "missing bearer token: send metadata 'authorization: Bearer <token>' (wisp-edge --token-file)"
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "malformed authorization metadata: expected 'Bearer <token>'"
        device = self.tokens.device_of(token.strip())
        if device is None:
            return None, f"unknown bearer token (sha256 {token_digest(token.strip())}…); check the server's tokens file"
        return device, ""

    def _checked_speculate(self, behavior, device: str | None):
        def checked(requests: Iterator[pb.SpeculateRequest], context: grpc.ServicerContext):
            refusals: list[Refusal] = []
            responses = behavior(self._checked_requests(requests, device, context, refusals), context)
            return self._ended_by(responses, refusals, context)

        return checked

    def _checked_requests(
        self, requests, device: str | None, context: grpc.ServicerContext, refusals: list[Refusal]
    ) -> Iterator[pb.SpeculateRequest]:
        """The stream's requests as the service reads them: the `open` (the first) admitted, rounds counted."""
        who = device
        try:
            for index, message in enumerate(requests):
                # Not a message: a malformed one (wisp_server.service.MalformedRequest), which the service refuses.
                kind = message.WhichOneof("kind") if isinstance(message, pb.SpeculateRequest) else None
                if index == 0 and kind == "open":  # otherwise the service refuses the stream
                    who = self._admit(message.open, device, context)
                elif kind == "draft" and self.rounds is not None:
                    self._take(self.rounds, who or _peer_host(context), "rounds per second", 1)
                yield message
        except Refusal as refusal:
            refusals.append(refusal)
            raise

    def _admit(self, open_msg: pb.OpenSession, device: str | None, context: grpc.ServicerContext) -> str:
        """Binds a session, fresh or resumed, to the token's device and counts it; returns the device."""
        claimed = open_msg.device.device_id
        if device is not None and claimed and claimed != device:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token belongs to device {device!r}; it cannot open or resume a session as {claimed!r}",
            )
        if device is not None:
            open_msg.device.device_id = device  # an edge that names no device is the token's
        who = device or claimed or _peer_host(context)
        if self.sessions is not None:
            self._take(self.sessions, who, "sessions per minute", 60)
        return who

    def _ended_by(self, responses, refusals: list[Refusal], context) -> Iterator[pb.SpeculateResponse]:
        """The service's responses; where a request was refused, the call then ends with that refusal."""
        try:
            yield from responses
        except Exception:  # the service's own ending of a stream that ended under it
            if not refusals:
                raise
        if refusals:
            self._refuse(context, refusals[0])

    def _checked_generate(self, behavior, device: str | None):
        def checked(request: pb.GenerateRequest, context: grpc.ServicerContext):
            assert self.sessions is not None
            try:
                self._take(self.sessions, device or _peer_host(context), "sessions per minute", 60)
            except Refusal as refusal:
                self._refuse(context, refusal)
            return behavior(request, context)

        return checked

    @staticmethod
    def _take(limit: DeviceRateLimit, device: str, unit: str, per_unit: float) -> None:
        """Takes one from ``device``'s bucket, or raises the refusal with the wait as its retry hint."""
        wait = limit.take(device)
        if wait > 0:
            retry_ms = math.ceil(wait * 1000)
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"device {device!r} is over its limit of {limit.rate * per_unit:g} {unit}; retry in {retry_ms} ms",
                retry_ms,
            )

    def _refuse(self, context: grpc.ServicerContext, refusal: Refusal) -> None:
        """Ends the call: counted, logged (never with a token) and told to the client."""
        self.metrics.refused.labels(refusal.status.name).inc()
        log.warning("refused a call from %s: %s: %s", context.peer(), refusal.status.name, refusal.message)
        if refusal.retry_after_ms is not None:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(refusal.retry_after_ms)),))
        context.abort(refusal.status, refusal.message)


def _refusing(handler: grpc.RpcMethodHandler, refuse: Callable[[grpc.ServicerContext], None]) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that refuses at once, reading nothing the client sent."""

    def behavior(request_or_iterator: object, context: grpc.ServicerContext) -> None:
        refuse(context)

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(behavior, handler.request_deserializer, handler.response_serializer)


def _peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port: who it is when it has no token and names no device."""
    return context.peer().rpartition(":")[0] or context.peer()


def access_interceptors(config: ServerConfig, metrics: ServerMetrics) -> list[grpc.ServerInterceptor]:
    """The server's interceptor, where tokens or rate limits are configured."""
    tokens = DeviceTokens.load(config.tokens_file) if config.tokens_file else None
    sessions = (
        DeviceRateLimit(config.sessions_per_minute / 60, max(1.0, config.sessions_per_minute))
        if config.sessions_per_minute > 0
        else None
    )
    rounds = (
        DeviceRateLimit(config.rounds_per_second, max(1.0, config.rounds_per_second))
        if config.rounds_per_second > 0
        else None
    )
    if tokens is None and sessions is None and rounds is None:
        return []
    return [AccessInterceptor(tokens, sessions, rounds, metrics)]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS from the config's PEM files, requiring client certificates where a client CA is given; None: plaintext."""
    if not (config.tls_cert or config.tls_key):
        if config.tls_client_ca:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def listen(server: grpc.Server, config: ServerConfig) -> int:
    """Adds the server's port, with TLS where configured; returns the port (0: could not listen)."""
    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    if credentials is not None:
        mode = "mutual TLS" if config.tls_client_ca else "TLS"
        log.info("serving %s on %s", mode, address)
        return server.add_secure_port(address, credentials)
    if not is_loopback(config.host):
        log.warning(
            "listening on %s without TLS: prompts, drafts and bearer tokens cross the network in plaintext; "
            "give --tls-cert and --tls-key (docs/security.md)",
            address,
        )
    return server.add_insecure_port(address)
