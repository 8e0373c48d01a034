"""The server's Prometheus metrics and health, over real loopback sockets, against what a run really did.

Sessions are driven over raw gRPC so the test knows every draft, verdict and
ending, and the scrape is read by Prometheus' own parser: the counters must
agree with the verdicts exactly, not merely move.
"""

from __future__ import annotations

import contextlib
import math
import queue
import socket
import threading
import time
from collections.abc import Iterator
from urllib.error import HTTPError
from urllib.request import urlopen

import grpc
import pytest
from conftest import make_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import reference_greedy, running_server
from prometheus_client.parser import text_string_to_metric_families

from wisp_common import __version__
from wisp_common.config import ServerConfig
from wisp_common.models import load_causal_lm, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import RETRY_AFTER_KEY, SERVER_LOADING_KEY
from wisp_common.systemd import notify
from wisp_edge.client import ResumePolicy
from wisp_server.engines.factory import build_engine
from wisp_server.launcher import ServerProcess
from wisp_server.server import LOADING, WispServer

PROMPT = [1, 504, 3458, 282, 4649, 314, 5465, 47]
MAX_NEW = 12
Samples = dict[tuple[str, frozenset], float]


def scrape(port: int) -> Samples:
    """Every sample, keyed by its name and labels, as Prometheus would read it."""
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def health_status(address: str, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def http_health(port: int) -> int:
    try:
        return urlopen(f"http://127.0.0.1:{port}/health", timeout=10).status
    except HTTPError as error:
        return error.code


class Stream:
    """One Speculate stream driven a message at a time: the test answers each verdict as an edge would."""

    def __init__(self, stub: pb_grpc.WispStub):
        self._requests: queue.Queue = queue.Queue()
        self._responses: Iterator[pb.SpeculateResponse] = stub.Speculate(iter(self._requests.get, None), timeout=60)
        self.sent = self.received = 0  # messages

    def send(self, request: pb.SpeculateRequest | None) -> None:
        self._requests.put(request)
        self.sent += request is not None

    def receive(self) -> pb.SpeculateResponse:
        response = next(self._responses)
        self.received += 1
        return response

    def rest(self) -> list[pb.SpeculateResponse]:
        self.send(None)
        responses = list(self._responses)
        self.received += len(responses)
        return responses


def open_session(tokenizer, kind: str, slo: pb.Slo | None = None) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(
        open=pb.OpenSession(
            draft_model=pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)),
            prompt_token_ids=PROMPT,
            stop=pb.StopCondition(max_new_tokens=MAX_NEW, ignore_eos=True),
            slo=slo,
            device=pb.DeviceInfo(device_id=f"a-{kind}", kind=kind),
        )
    )


def draft(position: int, tokens: list[int]) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(draft=pb.DraftRound(position=position, token_ids=tokens))


class Run:
    """What the edges saw: per round, the drafts the server verified and how many it accepted."""

    def __init__(self) -> None:
        self.rounds: list[tuple[str, int, int]] = []  # (device kind label, drafts, accepted)
        self.streams: list[Stream] = []
        self.generate_tokens = self.generate_responses = 0

    def speculate(self, stub, tokenizer, reference: list[int], kind: str, label: str, rounds: int, **slo) -> None:
        """Drafts the target's own next tokens (the third one wrong) for ``rounds`` rounds or until finished."""
        stream = Stream(stub)
        self.streams.append(stream)
        stream.send(open_session(tokenizer, kind, pb.Slo(**slo) if slo else None))
        position = stream.receive().opened.position
        for _ in range(rounds):
            done = position - len(PROMPT)
            tokens = [*reference[done : done + 2], (reference[done + 2] + 1) % 1000]
            stream.send(draft(position, tokens))
            verdict = stream.receive().verdict
            verified = min(len(tokens), MAX_NEW - done - 1)  # drafts past the session's room are never verified
            self.rounds.append((label, verified, verdict.num_accepted))
            position = verdict.position
            if verdict.finished:
                break
        assert stream.rest() == []

    def generate(self, stub) -> None:
        request = pb.GenerateRequest(prompt_token_ids=PROMPT, stop=pb.StopCondition(max_new_tokens=5, ignore_eos=True))
        responses = list(stub.Generate(request, timeout=60))
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        self.generate_tokens = sum(len(r.token_ids) for r in responses)
        self.generate_responses = len(responses)


@pytest.fixture(scope="module")
def run(tiny_pair, smollm2_tokenizer):
    """A fresh server and a short run on it: sessions from three kinds of device that end in four ways."""
    reference = reference_greedy(load_causal_lm(tiny_pair[0]), PROMPT, MAX_NEW + 3)
    with running_server(tiny_pair[0], engine="hf", metrics_port=0, profile_estimator=False) as server:
        stub = pb_grpc.WispStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        edges = Run()
        # Met its SLO; ran to its length.
        edges.speculate(
            stub,
            smollm2_tokenizer,
            reference,
            "jetson-orin-nano",
            "jetson-orin-nano",
            99,
            ttft_seconds=60,
            tpot_seconds=60,
        )
        # An unknown kind is labelled "other"; a TTFT no server can meet.
        edges.speculate(stub, smollm2_tokenizer, reference, "toaster-9000", "other", 99, ttft_seconds=1e-9)
        # The edge closes after one round: cancelled.
        edges.speculate(stub, smollm2_tokenizer, reference, "laptop", "laptop", 1)
        # A round at the wrong position: refused, the session ends in an error.
        stream = Stream(stub)
        edges.streams.append(stream)
        stream.send(open_session(smollm2_tokenizer, "laptop"))
        stream.receive()
        stream.send(draft(len(PROMPT) + 5, [1]))
        with pytest.raises(grpc.RpcError) as refused:
            stream.receive()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        edges.generate(stub)  # the target alone: no device, no drafts
        yield server, edges, scrape(server.metrics_port)


def test_sessions_and_how_they_ended(run):
    server, edges, samples = run
    assert total(samples, "wisp_sessions_total") == 5
    labels = {"model_name": server.config.target_model, "policy": "wisp"}
    ended = {
        (dict(ls)["device_kind"], dict(ls)["reason"]): v
        for (n, ls), v in samples.items()
        if n == "wisp_sessions_finished_total"
    }
    assert ended == {
        ("jetson-orin-nano", "length"): 1,
        ("other", "length"): 2,  # the toaster and the Generate stream
        ("laptop", "cancelled"): 1,
        ("laptop", "error"): 1,
    }
    assert total(samples, "wisp_sessions_finished_total", **labels) == 5
    assert total(samples, "wisp_refused_requests_total", code="FAILED_PRECONDITION") == 1
    assert total(samples, "wisp_sessions_active") == 0


def test_speculative_decoding_counters_agree_with_the_verdicts(run):
    _, edges, samples = run
    drafts = sum(d for _, d, _ in edges.rounds)
    accepted = sum(a for _, _, a in edges.rounds)
    assert accepted > 0 and accepted < drafts  # the run accepted some drafts and rejected others
    assert total(samples, "wisp_spec_decode_num_drafts_total") == sum(d > 0 for _, d, _ in edges.rounds)
    assert (
        total(samples, "wisp_spec_decode_num_draft_tokens_total") == drafts == total(samples, "wisp_draft_tokens_total")
    )
    assert (
        total(samples, "wisp_spec_decode_num_accepted_tokens_total")
        == accepted
        == total(samples, "wisp_accepted_tokens_total")
    )
    positions = {int(dict(ls)["position"]) for n, ls in samples if n.endswith("_per_pos_total")}
    per_position = {
        p: total(samples, "wisp_spec_decode_num_accepted_tokens_per_pos_total", position=str(p)) for p in positions
    }
    assert sum(per_position.values()) == accepted
    assert per_position == {p: sum(a > p for _, _, a in edges.rounds) for p in range(max(a for *_, a in edges.rounds))}
    for kind in ("jetson-orin-nano", "other", "laptop"):
        assert total(samples, "wisp_spec_decode_num_accepted_tokens_total", device_kind=kind) == sum(
            a for label, _, a in edges.rounds if label == kind
        )
    assert total(samples, "wisp_rounds_total") == len(edges.rounds) + edges.generate_tokens
    assert total(samples, "wisp_output_tokens_total") == MAX_NEW * 2 + (edges.rounds[-1][2] + 1) + 5


def test_every_stream_message_is_counted_by_direction(run):
    """What the edges sent (opens, drafts, the refused stream's misplaced round, Generate's request) and received
    (opened, verdicts, Generate's responses), message for message."""
    _, edges, samples = run
    sent = sum(s.sent for s in edges.streams) + 1  # and Generate's request
    assert total(samples, "wisp_stream_messages_total", direction="received") == sent
    received = sum(s.received for s in edges.streams) + edges.generate_responses
    assert total(samples, "wisp_stream_messages_total", direction="sent") == received > len(edges.rounds)


def test_latency_and_slo(run):
    _, _, samples = run
    # Every session that committed a token, and two or more for a TPOT: all but the refused one. (The cancelled
    # one committed three tokens in one round: a TPOT of 0, as an edge would measure it.)
    assert total(samples, "wisp_ttft_seconds_count") == 4
    assert total(samples, "wisp_tpot_seconds_count") == 4
    assert total(samples, "wisp_ttft_seconds_bucket", le="+Inf") == 4
    assert 0 < total(samples, "wisp_ttft_seconds_sum") < 60
    assert total(samples, "wisp_slo_sessions_total") == 2
    assert total(samples, "wisp_slo_misses_total", kind="ttft", device_kind="other") == 1
    assert total(samples, "wisp_slo_misses_total", kind="tpot") == 0
    assert total(samples, "wisp_slo_met_total", device_kind="jetson-orin-nano") == 1
    assert total(samples, "wisp_goodput_tokens_total") == MAX_NEW


def test_server_state_build_and_process(run):
    server, _, samples = run
    info = {"version": __version__, "model_name": server.config.target_model, "policy": "wisp"}
    assert total(samples, "wisp_build_info", **info) == 1
    assert total(samples, "wisp_rounds_waiting") == 0
    assert total(samples, "wisp_serving") == 1
    assert total(samples, "wisp_engine_errors_total") == 0
    assert math.isnan(total(samples, "wisp_kv_cache_usage_ratio"))  # the hf engine's cache has no bound
    assert total(samples, "wisp_batch_tokens_count") == total(samples, "wisp_batch_size_count") > 0
    assert total(samples, "process_cpu_seconds_total") > 0 and total(samples, "process_resident_memory_bytes") > 0
    assert total(samples, "python_info") == 1


def test_a_device_kind_label_never_comes_from_outside_the_fixed_set(run):
    from wisp_common.device_kind import KINDS, OTHER

    _, _, samples = run
    kinds = {dict(labels)["device_kind"] for _, labels in samples if "device_kind" in dict(labels)}
    assert kinds == {"jetson-orin-nano", "laptop", OTHER} and kinds <= {*KINDS, OTHER}


def test_health_is_not_serving_while_the_target_loads_and_serving_once_ready(tiny_pair, smollm2_tokenizer):
    """The main() order: the server starts before its engine exists, then takes it. An edge that comes while it
    loads is told to retry, not failed, even with no retries to spare."""
    config = ServerConfig(
        target_model=tiny_pair[0],
        engine="hf",
        device="cpu",
        port=0,
        metrics_port=0,
        max_sessions=2,
        max_context_tokens=128,
        profile_estimator=False,
    )
    server = WispServer(config)
    server.start()
    address = f"127.0.0.1:{server.port}"
    try:
        for service in ("", "wisp.v1.Wisp"):
            assert health_status(address, service) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert http_health(server.metrics_port) == 503
        stub = pb_grpc.WispStub(grpc.insecure_channel(address))
        with pytest.raises(grpc.RpcError) as loading:
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert (loading.value.code(), loading.value.details()) == (grpc.StatusCode.UNAVAILABLE, LOADING)
        trailers = dict(loading.value.trailing_metadata())
        assert trailers == {RETRY_AFTER_KEY: str(config.retry_after_ms), SERVER_LOADING_KEY: "1"}
        with pytest.raises(grpc.RpcError) as loading:
            list(stub.Speculate(iter([pb.SpeculateRequest()]), timeout=10))
        assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
        edge = make_client(address, tiny_pair[1], smollm2_tokenizer, resume=ResumePolicy(max_retries=0))
        answer: list = []
        early = threading.Thread(target=lambda: answer.append(edge.generate([1, 504, 3458], max_new_tokens=6)))
        early.start()
        time.sleep(1.5)  # refused at least once while loading
        assert early.is_alive()

        server.serve(build_engine(config))
        early.join(timeout=60)
        assert len(answer[0].token_ids) == 6 and answer[0].stats.resumes >= 1
        for service in ("", "wisp.v1.Wisp"):
            assert health_status(address, service) == health_pb2.HealthCheckResponse.SERVING
        assert http_health(server.metrics_port) == 200
        assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).engine == "hf"

        server.mark_not_serving("the test says so")  # what a fatal engine failure does
        assert health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert http_health(server.metrics_port) == 503
    finally:
        server.stop(grace=1)


def test_notify_writes_to_systemds_datagram_socket(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert systemd.recv(64) == b"READY=1"
    assert not notify("READY=1", {})  # not started by systemd: nothing to tell


@pytest.mark.slow
def test_wisp_server_is_not_serving_while_it_loads_then_tells_systemd_it_is_ready(tiny_pair, tmp_path):
    """The real command: health probed from the start, systemd's notify socket listening."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        while not done.is_set():
            with contextlib.suppress(grpc.RpcError):  # not listening yet
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if not seen or seen[-1] != status:
                    seen.append(status)
            time.sleep(0.05)

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.settimeout(60)
        watcher = threading.Thread(target=watch)
        watcher.start()
        args = ["--target-model", tiny_pair[0], "--engine", "hf", "--device", "cpu", "--port", str(port)]
        try:
            with ServerProcess(args, log_prefix=None, env={"NOTIFY_SOCKET": str(tmp_path / "notify")}) as server:
                assert systemd.recv(64) == b"READY=1"
                assert http_health(server.metrics_port) == 200
                time.sleep(0.3)  # the watcher sees SERVING
        finally:
            done.set()
            watcher.join()
        assert systemd.recv(64) == b"STOPPING=1"
    status = health_pb2.HealthCheckResponse
    assert seen[:2] == [status.NOT_SERVING, status.SERVING], seen
    assert server.process.returncode == 0
