"""How the edge reaches its verification servers: the one place that makes the edge's gRPC channels.

A channel carries TLS where configured (verifying the server against ``--tls-ca`` or the system's CAs, and
presenting a client certificate for mutual TLS), the device's bearer token on every call (``authorization:
Bearer <token>``, also over plaintext, so a laptop demo can use tokens), keepalive pings and the message size
limit.

``--server`` names one server, a gRPC target that resolves to several addresses (``dns:///wisp.example:50051``,
a Kubernetes headless Service: gRPC's round_robin policy spreads calls over them) or a comma-separated list of
servers, over which `BalancedChannel` spreads new calls. A session is one Speculate call, so it stays on the
server it started on; a resumed session is a new call and may start on another.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from wisp_common.config import EdgeConfig, grpc_message_options, is_loopback, keepalive_options

# Target schemes gRPC resolves itself; the text after them may hold commas (ipv4:10.0.0.1:50051,10.0.0.2:50051).
log = logging.getLogger(__name__)

GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def connect(config: EdgeConfig) -> grpc.Channel:
    """A channel to the configured server or servers, with the configured credentials and token."""
    credentials = channel_credentials(config)
    token = bearer_token(config)
    targets = server_targets(config.server)
    if token and credentials is None and not all(_is_local(target) for target in targets):
        log.warning(
            "sending the bearer token to %s without TLS: anyone on the network path can read and reuse it; give "
            "--tls or --tls-ca (docs/security.md)",
            config.server,
        )
    channels = [_channel(target, credentials, token, config) for target in targets]
    return channels[0] if len(channels) == 1 else BalancedChannel(channels)


def server_targets(server: str) -> list[str]:
    """``--server`` as gRPC targets: one target with a scheme, else each host:port of a comma-separated list."""
    if server.startswith(GRPC_SCHEMES):
        return [server]
    targets = [target.strip() for target in server.split(",") if target.strip()]
    if not targets:
        raise ValueError("--server is empty: give host:port, a comma-separated list of them, or dns:///name:port")
    return targets


def _is_local(target: str) -> bool:
    """Whether every address of a gRPC target is on this machine (a Unix socket, or loopback)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    addresses = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target.split("///")[-1]
    return all(is_loopback(address.rsplit(":", 1)[0]) for address in addresses.split(","))


def channel_credentials(config: EdgeConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext (neither --tls nor a CA or client certificate given)."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("mutual TLS needs both --tls-cert and --tls-key")
    if not (config.tls or config.tls_ca or config.tls_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(config.tls_ca).read_bytes() if config.tls_ca else None,
        private_key=Path(config.tls_key).read_bytes() if config.tls_key else None,
        certificate_chain=Path(config.tls_cert).read_bytes() if config.tls_cert else None,
    )


def bearer_token(config: EdgeConfig) -> str:
    """The device's token from --token (WISP_TOKEN) or --token-file; empty where the server asks none."""
    if config.token and config.token_file:
        raise ValueError("give the bearer token once: --token (WISP_TOKEN) or --token-file, not both")
    return Path(config.token_file).read_text().strip() if config.token_file else config.token.strip()


def _channel(target: str, credentials: grpc.ChannelCredentials | None, token: str, config: EdgeConfig) -> grpc.Channel:
    options = [
        *keepalive_options(config.keepalive_seconds, config.keepalive_timeout, server=False),
        *grpc_message_options(config.grpc_max_message_bytes),
        ("grpc.service_config", ROUND_ROBIN),
    ]
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerToken(***)"  # never the secret, in a traceback or a log line

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class BalancedChannel(grpc.Channel):
    """Several servers behind one channel: each new call goes to the server with the fewest calls this edge has
    open on it, ties taken in turn from a random start (so edges started together do not all pick the first).

    A call, and so a session, stays on the server it started on.
    """

    def __init__(self, channels: list[grpc.Channel]):
        self.channels = channels
        self._open = [0] * len(channels)
        self._next = random.randrange(len(channels))
        self._lock = threading.Lock()

    def _pick(self) -> int:
        with self._lock:
            fewest = min(self._open)
            count = len(self.channels)
            index = next(i % count for i in range(self._next, self._next + count) if self._open[i % count] == fewest)
            self._next = index + 1
            self._open[index] += 1
            return index

    def _done(self, index: int) -> None:
        with self._lock:
            self._open[index] -= 1

    def open_calls(self) -> list[int]:
        """Calls open on each server, in ``channels`` order."""
        with self._lock:
            return list(self._open)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> _BalancedMethod:
        return _BalancedMethod(self, [c.unary_unary(method, *args, **kwargs) for c in self.channels])

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _BalancedMethod:
        return _BalancedMethod(self, [c.unary_stream(method, *args, **kwargs) for c in self.channels])

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _BalancedMethod:
        return _BalancedMethod(self, [c.stream_unary(method, *args, **kwargs) for c in self.channels])

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _BalancedMethod:
        return _BalancedMethod(self, [c.stream_stream(method, *args, **kwargs) for c in self.channels])

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        """Connectivity of every server: ``callback`` hears each one's changes."""
        for channel in self.channels:
            channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        for channel in self.channels:
            channel.unsubscribe(callback)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> BalancedChannel:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.close()
        return False


class _BalancedMethod:
    """One RPC method over every server: each call picks its server, and counts as open there until it ends."""

    def __init__(self, balancer: BalancedChannel, methods: list[Any]):
        self._balancer = balancer
        self._methods = methods

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        index = self._balancer._pick()
        try:
            call = self._methods[index](*args, **kwargs)
        except BaseException:
            self._balancer._done(index)
            raise
        if isinstance(call, grpc.Future):  # a streamed response: open until the stream ends
            call.add_done_callback(lambda _: self._balancer._done(index))
        else:  # a unary response has arrived: the call is over
            self._balancer._done(index)
        return call
