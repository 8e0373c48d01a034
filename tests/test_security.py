"""Security over real loopback sockets with real certificates: TLS and mutual TLS, per-device bearer tokens,
per-device rate limits, and no secret in logs or metrics.

The certificates are made here with `cryptography`: a CA, a server certificate for 127.0.0.1 and localhost, a
client certificate, and a second CA with its own client certificate that neither side trusts.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import subprocess
import sys
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import reference_greedy, running_server
from prometheus_client.parser import text_string_to_metric_families

from wisp_common.config import EdgeConfig, ServerConfig
from wisp_common.models import load_causal_lm, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_edge.client import EdgeClient
from wisp_edge.connection import connect
from wisp_edge.drafter import ModelDrafter
from wisp_server.auth import DeviceTokens, listen, token_digest
from wisp_server.launcher import ServerProcess
from wisp_server.rate_limit import DeviceRateLimit

PROMPT = [1, 504, 3458, 282, 4649, 314, 5465, 47]


# --- certificates -------------------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(common_name: str, key, issuer: tuple[x509.Name, object] | None, usage=None, sans=()) -> x509.Certificate:
    """A certificate for ``key``; self-signed (a CA) where ``issuer`` is None."""
    now = datetime.now(timezone.utc)
    issuer_name, issuer_key = issuer or (_name(common_name), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, key, certificate: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("pki")
    paths: dict[str, str] = {}
    for ca_name in ("ca", "other_ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _issue(f"wisp test {ca_name}", ca_key, None)
        paths[ca_name], _ = _write(directory, ca_name, ca_key, ca)
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = _issue("edge-a", client_key, (ca.subject, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH)
        prefix = "" if ca_name == "ca" else "other_"
        paths[f"{prefix}client_cert"], paths[f"{prefix}client_key"] = _write(
            directory, f"{prefix}client", client_key, client
        )
        if ca_name == "ca":
            server_key = ec.generate_private_key(ec.SECP256R1())
            sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
            server = _issue("wisp server", server_key, (ca.subject, ca_key), ExtendedKeyUsageOID.SERVER_AUTH, sans)
            paths["server_cert"], paths["server_key"] = _write(directory, "server", server_key, server)
    return paths


# --- servers and clients --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> tuple[str, dict[str, str]]:
    by_device = {device: secrets.token_urlsafe(32) for device in ("edge-a", "edge-b")}
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text("# device token\n" + "".join(f"{d} {t}\n" for d, t in by_device.items()))
    path.chmod(0o600)
    return str(path), by_device


@pytest.fixture(scope="module")
def secure_server(tiny_pair, pki, tokens):
    """Mutual TLS and tokens."""
    options = dict(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    with running_server(
        tiny_pair[0], engine="hf", metrics_port=0, profile_estimator=False, tokens_file=tokens[0], **options
    ) as server:
        yield server, f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def limited_server(tiny_pair, pki):
    """TLS without client certificates or tokens, and tight rate limits: 2 sessions a minute, 2 rounds a second."""
    options = dict(tls_cert=pki["server_cert"], tls_key=pki["server_key"], sessions_per_minute=2, rounds_per_second=2)
    with running_server(tiny_pair[0], engine="hf", metrics_port=0, profile_estimator=False, **options) as server:
        yield server, f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def target_model(tiny_pair):
    return load_causal_lm(tiny_pair[0])


def mtls(address: str, pki: dict[str, str], **options) -> EdgeConfig:
    """An edge's config for the mutual TLS server: its CA, and this device's certificate."""
    return EdgeConfig(
        server=address, tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"], **options
    )


def metrics_text(server) -> str:
    return urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()


def metric(server, name: str, **labels: str) -> float:
    """One sample of the server's /metrics, read by Prometheus' own parser (0 where it has none yet)."""
    for family in text_string_to_metric_families(metrics_text(server)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def open_request(tokenizer, device_id: str = "", committed: list[int] = ()) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(
        open=pb.OpenSession(
            draft_model=pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)),
            prompt_token_ids=PROMPT,
            committed_token_ids=list(committed),
            stop=pb.StopCondition(max_new_tokens=16, ignore_eos=True),
            device=pb.DeviceInfo(device_id=device_id),
        )
    )


def edge_client(channel: grpc.Channel, draft_dir: str, tokenizer, device_id: str) -> EdgeClient:
    identity = pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    return EdgeClient(channel, ModelDrafter(load_causal_lm(draft_dir)), identity, pb.DeviceInfo(device_id=device_id))


def refusal(call, *args, **kwargs) -> grpc.RpcError:
    """The error a call ends with; streamed responses are read to the end."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, timeout=15, **kwargs)
        if not isinstance(result, pb.ServerInfo):
            list(result)
    return caught.value


# --- TLS ------------------------------------------------------------------------------------------------------


def test_tls_and_mutual_tls_admit_only_clients_that_verify_and_are_verified(secure_server, limited_server, pki):
    """Plaintext, an untrusted server certificate and a missing or foreign client certificate all fail."""
    request = pb.GetServerInfoRequest()
    tls_only = limited_server[1]
    info = pb_grpc.WispStub(connect(EdgeConfig(server=tls_only, tls_ca=pki["ca"]))).GetServerInfo(request, timeout=15)
    assert info.engine == "hf"
    for config in (
        EdgeConfig(server=tls_only),  # plaintext to a TLS server
        EdgeConfig(server=tls_only, tls_ca=pki["other_ca"]),  # a server certificate this edge does not trust
        EdgeConfig(server=secure_server[1], tls_ca=pki["ca"]),  # mutual TLS without a client certificate
        EdgeConfig(
            server=secure_server[1],
            tls_ca=pki["ca"],
            tls_cert=pki["other_client_cert"],
            tls_key=pki["other_client_key"],
        ),  # a client certificate from a CA the server does not trust
    ):
        error = refusal(pb_grpc.WispStub(connect(config)).GetServerInfo, request)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, config


@pytest.mark.parametrize(
    "host, tls, warned", [("0.0.0.0", False, True), ("127.0.0.1", False, False), ("0.0.0.0", True, False)]
)
def test_the_server_warns_when_it_listens_beyond_loopback_without_tls(host, tls, warned, pki, caplog):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    certificates = dict(tls_cert=pki["server_cert"], tls_key=pki["server_key"]) if tls else {}
    with caplog.at_level(logging.WARNING, logger="wisp_server.auth"):
        assert listen(server, ServerConfig(host=host, port=0, **certificates)) > 0
    server.stop(None)
    assert ("without TLS" in caplog.text) == warned


TOKEN = "a-device-token-of-32-characters!"


@pytest.mark.parametrize(
    "server, options, warned",
    [
        ("wisp.example:50051", {"token": TOKEN}, True),
        ("127.0.0.1:50051,[::1]:50052,localhost:1", {"token": TOKEN}, False),
        ("dns:///wisp.example:50051", {"token": TOKEN}, True),
        ("ipv4:127.0.0.1:1,10.0.0.2:1", {"token": TOKEN}, True),
        ("unix:/run/wisp.sock", {"token": TOKEN}, False),
        ("wisp.example:50051", {"token": TOKEN, "tls": True}, False),
        ("wisp.example:50051", {}, False),  # no token to leak
    ],
)
def test_the_edge_warns_when_it_sends_its_token_beyond_loopback_without_tls(server, options, warned, caplog):
    with caplog.at_level(logging.WARNING, logger="wisp_edge.connection"):
        connect(EdgeConfig(server=server, **options)).close()
    assert ("without TLS" in caplog.text) == warned
    assert TOKEN not in caplog.text


# --- tokens ---------------------------------------------------------------------------------------------------


def test_tls_and_a_token_generate_exactly_what_the_target_would(
    secure_server, pki, tokens, tiny_pair, smollm2_tokenizer, target_model
):
    config = mtls(secure_server[1], pki, token=tokens[1]["edge-a"])
    client = edge_client(connect(config), tiny_pair[1], smollm2_tokenizer, "edge-a")
    result = client.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    assert result.token_ids == reference_greedy(target_model, PROMPT, 24)
    assert result.stats.rounds > 1


def test_a_missing_or_wrong_token_is_refused_before_any_work(secure_server, pki, tokens, smollm2_tokenizer):
    server, address = secure_server
    stub = pb_grpc.WispStub(connect(mtls(address, pki)))  # no token of its own
    sessions, rounds = metric(server, "wisp_sessions_total"), metric(server, "wisp_rounds_total")
    refused = metric(server, "wisp_refused_requests_total", code="UNAUTHENTICATED")
    generate = pb.GenerateRequest(prompt_token_ids=PROMPT, stop=pb.StopCondition(max_new_tokens=4))
    cases = {
        (): "missing bearer token",
        (("authorization", "Bearer " + secrets.token_urlsafe(32)),): "unknown bearer token",
        (("authorization", tokens[1]["edge-a"]),): "malformed authorization",  # no "Bearer"
    }
    for metadata, message in cases.items():
        for call, argument in (
            (stub.Speculate, iter([open_request(smollm2_tokenizer, "edge-a")])),
            (stub.Generate, generate),
            (stub.GetServerInfo, pb.GetServerInfoRequest()),
        ):
            error = refusal(call, argument, metadata=metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and message in error.details()
    assert metric(server, "wisp_sessions_total") == sessions and metric(server, "wisp_rounds_total") == rounds
    assert metric(server, "wisp_refused_requests_total", code="UNAUTHENTICATED") == refused + 9
    health = health_pb2_grpc.HealthStub(connect(mtls(address, pki)))  # probes carry no token
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=15).status == health_pb2.HealthCheckResponse.SERVING


def test_a_token_opens_and_resumes_sessions_only_as_its_own_device(secure_server, pki, tokens, smollm2_tokenizer):
    server, address = secure_server
    as_a = pb_grpc.WispStub(connect(mtls(address, pki, token=tokens[1]["edge-a"])))
    as_b = pb_grpc.WispStub(connect(mtls(address, pki, token=tokens[1]["edge-b"])))
    sessions = metric(server, "wisp_sessions_total")
    committed = [504, 3458, 282]
    for request in (open_request(smollm2_tokenizer, "edge-b"), open_request(smollm2_tokenizer, "edge-b", committed)):
        error = refusal(as_a.Speculate, iter([request]))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "belongs to device 'edge-a'" in error.details() and "'edge-b'" in error.details()
    assert metric(server, "wisp_sessions_total") == sessions
    resumed = list(as_b.Speculate(iter([open_request(smollm2_tokenizer, "edge-b", committed)]), timeout=15))
    assert resumed[0].opened.position == len(PROMPT) + len(committed)
    unnamed = list(as_a.Speculate(iter([open_request(smollm2_tokenizer)]), timeout=15))  # the token's device
    assert unnamed[0].opened.session_id
    assert metric(server, "wisp_sessions_total") == sessions + 2


def test_no_secret_reaches_logs_or_metrics(secure_server, pki, tokens, tiny_pair, smollm2_tokenizer, caplog):
    """A run with tokens, good and bad, at DEBUG: the log names devices and token digests, never a token."""
    server, address = secure_server
    wrong = secrets.token_urlsafe(32)
    with caplog.at_level(logging.DEBUG):
        client = edge_client(
            connect(mtls(address, pki, token=tokens[1]["edge-a"])), tiny_pair[1], smollm2_tokenizer, "edge-a"
        )
        client.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
        for token, device in ((wrong, "edge-a"), (tokens[1]["edge-b"], "edge-a")):
            stub = pb_grpc.WispStub(connect(mtls(address, pki, token=token)))
            refusal(stub.Speculate, iter([open_request(smollm2_tokenizer, device)]))
        config = mtls(address, pki, token=tokens[1]["edge-a"])
        logging.getLogger("wisp_edge").info("edge config: %s", config)
    text = caplog.text + metrics_text(server)
    assert token_digest(wrong) in caplog.text and "PERMISSION_DENIED" in caplog.text  # the refusals were logged
    for secret in (*tokens[1].values(), wrong):
        assert secret not in text


def test_the_tokens_file_refuses_weak_or_shared_tokens(tmp_path):
    strong = secrets.token_urlsafe(32)
    for text, problem in (
        ("edge-a short-token\n", "shorter than 16"),
        (f"edge-a {strong}\nedge-b {strong}\n", "one token for two devices"),
        (f"edge-a {strong} extra\n", "expected 'device_id token'"),
        ("# nothing\n", "no tokens"),
    ):
        path = tmp_path / "tokens"
        path.write_text(text)
        with pytest.raises(ValueError, match=problem):
            DeviceTokens.load(path)
    path.write_text(f"edge-a {strong}\nedge-a {secrets.token_urlsafe(32)}  # rolled over\n")
    assert DeviceTokens.load(path).device_of(strong) == "edge-a"
    assert DeviceTokens.load(path).device_of(strong[:-1]) is None


@pytest.mark.slow
def test_the_command_lines_take_tls_and_tokens(tiny_pair, pki, tokens, tmp_path):
    """wisp-server and wisp-edge as processes: mutual TLS and a token file let `info` through, a wrong token in
    WISP_TOKEN is refused, and the server's whole log never shows a token."""
    token_file = tmp_path / "token"
    token_file.write_text(tokens[1]["edge-a"] + "\n")
    server_args = ["--target-model", tiny_pair[0], "--engine", "hf", "--device", "cpu", "--no-profile-estimator"]
    server_args += ["--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], "--tls-client-ca", pki["ca"]]
    wrong = secrets.token_urlsafe(32)
    with ServerProcess([*server_args, "--tokens-file", tokens[0]], log_prefix=None) as server:
        edge = [sys.executable, "-m", "wisp_edge.cli", "info", "--server", server.address, "--tls-ca", pki["ca"]]
        edge += ["--tls-cert", pki["client_cert"], "--tls-key", pki["client_key"]]
        allowed = subprocess.run([*edge, "--token-file", str(token_file)], capture_output=True, text=True, timeout=120)
        assert allowed.returncode == 0 and 'engine: "hf"' in allowed.stdout, allowed.stderr
        environment = {**os.environ, "WISP_TOKEN": wrong}
        refused = subprocess.run(edge, capture_output=True, text=True, timeout=120, env=environment)
        assert refused.returncode == 1 and "UNAUTHENTICATED: unknown bearer token" in refused.stderr
    log = "".join(server.log)
    assert "serving mutual TLS" in log and token_digest(wrong) in log
    assert not any(secret in log for secret in (*tokens[1].values(), wrong))


# --- rate limits ----------------------------------------------------------------------------------------------


def retry_after_ms(error: grpc.RpcError) -> int:
    return int(dict(error.trailing_metadata())["retry-after-ms"])


def test_sessions_over_a_devices_limit_are_refused_with_a_retry_hint(limited_server, pki, smollm2_tokenizer):
    server, address = limited_server
    stub = pb_grpc.WispStub(connect(EdgeConfig(server=address, tls_ca=pki["ca"])))
    for _ in range(2):  # the burst: a minute's worth
        assert list(stub.Speculate(iter([open_request(smollm2_tokenizer, "burst")]), timeout=15))[0].opened.session_id
    error = refusal(stub.Speculate, iter([open_request(smollm2_tokenizer, "burst")]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 sessions per minute" in error.details()
    assert 20_000 < retry_after_ms(error) <= 30_000  # one session every 30 s
    assert list(stub.Speculate(iter([open_request(smollm2_tokenizer, "calm")]), timeout=15))[0].opened.session_id


def test_rounds_over_a_devices_limit_are_refused_with_a_retry_hint(limited_server, pki, smollm2_tokenizer):
    """Ten empty drafts (one target token each) at once: the third within a second is over 2 rounds a second."""
    server, address = limited_server
    stub = pb_grpc.WispStub(connect(EdgeConfig(server=address, tls_ca=pki["ca"])))
    drafts = [pb.SpeculateRequest(draft=pb.DraftRound(round=i, position=len(PROMPT) + i)) for i in range(10)]
    responses = stub.Speculate(iter([open_request(smollm2_tokenizer, "chatty"), *drafts]), timeout=15)
    verdicts = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in responses:
            verdicts.append(response)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rounds per second" in caught.value.details()
    assert 0 < retry_after_ms(caught.value) <= 500
    assert 2 <= len(verdicts) - 1 < 10  # the burst's rounds were verified, then the limit held
    assert metric(server, "wisp_refused_requests_total", code="RESOURCE_EXHAUSTED") >= 1


def test_a_bucket_refills_at_its_rate_and_forgets_idle_devices():
    now = [0.0]
    limit = DeviceRateLimit(rate=0.5, capacity=2, max_idle_devices=2, clock=lambda: now[0])
    assert [limit.take("a"), limit.take("a")] == [0.0, 0.0]
    assert limit.take("a") == pytest.approx(2.0)  # one token back every 2 s
    now[0] = 1.0
    assert limit.take("a") == pytest.approx(1.0)
    now[0] = 2.0
    assert limit.take("a") == 0.0 and limit.take("b") == 0.0
    now[0] = 10.0  # both full again: the next new device makes room by forgetting them
    assert limit.take("c") == 0.0 and len(limit) == 1
