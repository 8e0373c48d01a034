"""Faults and overload: edges killed or stalled, failing batches, a dead engine, SIGTERM, a full server.

Real server and edge processes over loopback sockets; the only fake is the injected engine fault
(tests/fault_server.py wraps the real engine so one batch raises).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fault_server import FailingEngine
from faults import PROMPT, TESTS, Paced, edge_client, edge_process, metrics, tiny_server, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import reference_greedy

from wisp_common.config import EdgeConfig, ServerConfig
from wisp_common.models import load_causal_lm, tokenizer_fingerprint
from wisp_common.prompts import encode_prompt
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_edge.client import ResumePolicy
from wisp_edge.connection import connect
from wisp_server.engines.base import EngineDead
from wisp_server.engines.factory import build_engine
from wisp_server.launcher import ServerProcess
from wisp_server.server import WispServer


@pytest.fixture(scope="module")
def target_model(tiny_pair):
    return load_causal_lm(tiny_pair[0])


def in_process_server(target: str, fail_at: int | None = None, error: type[Exception] = RuntimeError, **options):
    """A WispServer on a free port, its real hf engine wrapped to fail batch ``fail_at`` where given."""
    defaults = dict(port=0, metrics_port=-1, max_sessions=4, max_context_tokens=1024, device="cpu")
    config = ServerConfig(target_model=target, engine="hf", profile_estimator=False, **{**defaults, **options})
    engine = build_engine(config)
    if fail_at is not None:
        engine = FailingEngine(engine, fail_at, error)
    server = WispServer(config, engine)
    server.start()
    return server, engine


def open_request(tokenizer, max_new_tokens: int = 16) -> pb.SpeculateRequest:
    identity = pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    return pb.SpeculateRequest(
        open=pb.OpenSession(
            draft_model=identity,
            prompt_token_ids=PROMPT,
            stop=pb.StopCondition(max_new_tokens=max_new_tokens, ignore_eos=True),
        )
    )


@pytest.mark.slow
def test_a_killed_edge_frees_its_session_at_once_and_disturbs_no_one(
    tiny_pair, smollm2_tokenizer, target_model, tmp_path
):
    """kill -9 an edge process mid-generation: the server frees its session within a second, while another
    session goes on to the target's exact output."""
    with tiny_server(tiny_pair[0]) as server:
        edge = edge_process(server.address, tiny_pair[1], tmp_path / "answer.jsonl", 3000)
        try:
            wait_until(lambda: metrics(server)["wisp_rounds_total"] >= 20, timeout=180)
            other = Paced(edge_client(server.address, tiny_pair[1], smollm2_tokenizer), after=10, pace=0.02,
                          max_new_tokens=200, ignore_eos=True)  # fmt: skip
            other.wait_reached()
            assert metrics(server)["wisp_sessions_active"] == 2
            edge.kill()
        finally:
            edge.kill()
            edge.wait()
        freed_in = wait_until(lambda: metrics(server)["wisp_sessions_active"] <= 1, timeout=5)
        assert other.running  # so the session that ended is the killed edge's
        assert freed_in < 1.0
        assert other.join().token_ids == reference_greedy(target_model, PROMPT, 200)
        wait_until(lambda: metrics(server)["wisp_sessions_active"] == 0, timeout=5)


@pytest.mark.slow
def test_a_stalled_edge_is_timed_out_and_resumes_once_it_wakes(tiny_pair, target_model, tmp_path, smollm2_tokenizer):
    """SIGSTOP an edge: it holds its connection but sends nothing. The server closes its session after
    --session-idle-timeout; continued, the edge resumes and its answer is still exact."""
    output = tmp_path / "answer.jsonl"
    with tiny_server(tiny_pair[0], 0, "--session-idle-timeout", "2") as server:
        edge = edge_process(server.address, tiny_pair[1], output, 600, "--round-timeout", "30")
        try:
            wait_until(lambda: metrics(server)["wisp_rounds_total"] >= 20, timeout=180)
            edge.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            wait_until(lambda: metrics(server)["wisp_sessions_active"] == 0, timeout=10)
            assert 2.0 <= time.monotonic() - stopped < 4.0
            edge.send_signal(signal.SIGCONT)
            assert edge.wait(timeout=300) == 0, edge.stderr.read()
        finally:
            edge.kill()
    prompt = encode_prompt(smollm2_tokenizer, "The tiny model rambles on", chat=False)
    answer = json.loads(output.read_text())
    assert answer["resumes"] >= 1
    assert answer["token_ids"] == reference_greedy(target_model, prompt, 600)


def test_a_failed_batch_fails_only_its_sessions(tiny_pair, smollm2_tokenizer, target_model):
    """Batch 6 raises: its sessions end INTERNAL with the reason, the others finish exactly, and the server
    serves on."""
    server, engine = in_process_server(tiny_pair[0], fail_at=6)
    try:
        address = f"127.0.0.1:{server.port}"
        runs = [Paced(edge_client(address, tiny_pair[1], smollm2_tokenizer), after=1, max_new_tokens=60,
                      ignore_eos=True) for _ in range(3)]  # fmt: skip
        failed, exact = 0, 0
        for run in runs:
            try:
                assert run.join().token_ids == reference_greedy(target_model, PROMPT, 60)
                exact += 1
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.INTERNAL and "injected fault" in error.details()
                failed += 1
        assert failed == len(engine.failed) >= 1 and exact == 3 - failed
        assert server.service.open_sessions == 0
        again = edge_client(address, tiny_pair[1], smollm2_tokenizer).generate(PROMPT, max_new_tokens=20)
        assert again.token_ids == reference_greedy(target_model, PROMPT, 20)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address)).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=0)


def test_a_dead_engine_turns_the_server_not_serving(tiny_pair, smollm2_tokenizer):
    """`EngineDead`: the sessions are told UNAVAILABLE (resume elsewhere), health says NOT_SERVING and the server
    asks to stop (the process then exits non-zero: the next test)."""
    server, _ = in_process_server(tiny_pair[0], fail_at=3, error=EngineDead)
    try:
        address = f"127.0.0.1:{server.port}"
        stubborn = ResumePolicy(round_timeout=3.0, max_retries=2, backoff=0.05, backoff_max=0.1)
        with pytest.raises(grpc.RpcError) as caught:
            edge_client(address, tiny_pair[1], smollm2_tokenizer, stubborn).generate(PROMPT, max_new_tokens=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.stopping.is_set() and isinstance(server.fatal, EngineDead)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address)).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(grace=0)


@pytest.mark.slow
def test_a_dead_engine_makes_the_server_process_exit_non_zero(tiny_pair, smollm2_tokenizer):
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "FAULT_AT": "3"}
    env["FAULT_FATAL"] = "1"
    with ServerProcess(
        ["--target-model", tiny_pair[0], "--engine", "hf", "--device", "cpu", "--no-profile-estimator"],
        log_prefix=None,
        env=env,
        module="fault_server",
    ) as server:
        stubborn = ResumePolicy(round_timeout=3.0, max_retries=1, backoff=0.05, backoff_max=0.1)
        with pytest.raises(grpc.RpcError) as caught:
            edge_client(server.address, tiny_pair[1], smollm2_tokenizer, stubborn).generate(PROMPT, max_new_tokens=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.process.wait(timeout=30) == 1
        wait_until(lambda: any("engine failed" in line for line in server.log), timeout=5)


@pytest.mark.slow
def test_sigterm_finishes_the_round_in_flight_and_sends_the_session_elsewhere(
    tiny_pair, smollm2_tokenizer, target_model
):
    with tiny_server(tiny_pair[0], 0, "--shutdown-grace", "5") as a, tiny_server(tiny_pair[0]) as b:
        run = Paced(edge_client(f"{a.address},{b.address}", tiny_pair[1], smollm2_tokenizer), after=30,
                    max_new_tokens=160, ignore_eos=True)  # fmt: skip
        run.wait_reached()
        leaving, staying = (a, b) if metrics(a)["wisp_sessions_active"] == 1 else (b, a)
        leaving.process.send_signal(signal.SIGTERM)
        assert leaving.process.wait(timeout=30) == 0  # well inside the grace: the session left at its next round
        result = run.join()
        assert result.token_ids == reference_greedy(target_model, PROMPT, 160) and result.stats.resumes >= 1
        assert any("shutting down" in line for line in leaving.log)
        assert metrics(staying)["wisp_sessions_total"] >= 1


@pytest.mark.parametrize("storm", [False, True])
def test_ctrl_c_stops_the_server_however_often_it_comes(tiny_pair, storm):
    """SIGINT once, or a storm of them for a fifth of a second (Ctrl-C pressed again and again, or sent to a wrapper
    and its child at once): the server shuts down and exits 0. A handler that set the server's stop Event itself
    deadlocked in a few storms in 30 and died of a RecursionError in most of the others."""
    with tiny_server(tiny_pair[0]) as server:
        server.process.send_signal(signal.SIGINT)
        until = time.monotonic() + 0.2
        while storm and time.monotonic() < until and server.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.process.pid, signal.SIGINT)
        assert server.process.wait(timeout=30) == 0
        assert any("shutting down" in line for line in server.log)


def test_a_full_server_gives_a_retry_hint_and_the_edge_gets_in_when_room_frees(
    tiny_pair, smollm2_tokenizer, target_model
):
    server, _ = in_process_server(tiny_pair[0], max_sessions=1, retry_after_ms=300)
    try:
        address = f"127.0.0.1:{server.port}"
        stub = pb_grpc.WispStub(grpc.insecure_channel(address))
        release = threading.Event()

        def held():
            yield open_request(smollm2_tokenizer)
            release.wait()

        holder = stub.Speculate(held())
        next(holder)  # opened: the server is full
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Speculate(iter([open_request(smollm2_tokenizer)]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(caught.value.trailing_metadata())["retry-after-ms"] == "300"

        run = Paced(edge_client(address, tiny_pair[1], smollm2_tokenizer), after=1, max_new_tokens=30, ignore_eos=True)
        time.sleep(1.5)  # a few refusals, each answered with the hint
        refused = server.metrics.refused.labels("RESOURCE_EXHAUSTED")._value.get()
        assert 2 <= refused <= 2 + 1.5 / 0.3  # backed off at least the hint each time: no storm
        release.set()
        list(holder)
        result = run.join()
        assert result.token_ids == reference_greedy(target_model, PROMPT, 30) and result.stats.resumes >= 1
    finally:
        server.stop(grace=0)


def test_sustained_overload_is_refused_without_queueing(tiny_pair, smollm2_tokenizer):
    """Many more streams than the server admits: every extra one is refused at once (the server's sessions,
    threads and queued calls stay bounded), and the admitted ones are unaffected."""
    server, _ = in_process_server(tiny_pair[0], max_sessions=2, session_idle_timeout=300)
    try:
        stub = pb_grpc.WispStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        release = threading.Event()

        def held():
            yield open_request(smollm2_tokenizer)
            release.wait()

        holders = [stub.Speculate(held()) for _ in range(2)]
        for holder in holders:
            next(holder)

        def refused(_: int) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Speculate(iter([open_request(smollm2_tokenizer)]), timeout=10))
            return caught.value.code()

        def refusals(count: int) -> list[grpc.StatusCode]:
            with ThreadPoolExecutor(8) as pool:  # eight clients at once, each retrying at once
                return list(pool.map(refused, range(count)))

        refusals(16)  # the server's thread pool warms up
        threads_before = threading.active_count()
        started = time.monotonic()
        assert set(refusals(64)) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert time.monotonic() - started < 60
        assert server.service.open_sessions == 2
        assert threading.active_count() <= threads_before + 2
        release.set()
        for holder in holders:
            list(holder)
    finally:
        server.stop(grace=0)


def test_backoff_is_jittered_capped_and_respects_the_servers_hint():
    policy = ResumePolicy(backoff=0.1, backoff_max=2.0)
    delays = [policy.delay(failures, None) for failures in range(1, 30)]
    assert all(0 <= d <= 2.0 for d in delays) and len(set(delays)) == len(delays)
    assert all(0.5 <= policy.delay(1, 0.5) <= 0.75 for _ in range(50))
    assert policy.wait_limit(0.01) == policy.round_timeout and policy.wait_limit(5.0) == 40.0


def test_keepalive_pings_keep_an_idle_session_up(tiny_pair, smollm2_tokenizer):
    """Edge pings every second on a session with nothing to say: the server accepts them (a server that found them
    too frequent would answer GOAWAY too_many_pings and cut the session) and the session goes on."""
    server, _ = in_process_server(tiny_pair[0])
    try:
        channel = connect(EdgeConfig(server=f"127.0.0.1:{server.port}", keepalive_seconds=1, keepalive_timeout=1))
        requests: queue.Queue = queue.Queue()
        responses = pb_grpc.WispStub(channel).Speculate(iter(requests.get, None), timeout=60)
        requests.put(open_request(smollm2_tokenizer))
        assert next(responses).opened.session_id
        time.sleep(5)  # idle: only pings cross
        requests.put(pb.SpeculateRequest(draft=pb.DraftRound(position=len(PROMPT))))
        assert next(responses).verdict.position == len(PROMPT) + 1
        requests.put(None)
    finally:
        server.stop(grace=0)
