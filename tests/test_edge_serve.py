"""`wisp-edge serve` and `wisp-edge chat` against a real verification server over loopback.

The daemon runs as its own process (real uvicorn on a free port) and is driven
by the official `openai` client: its text must be exactly the target's (checked
against the server's target-only `Generate` RPC), and the parts OpenAI clients
rely on (stop strings, max_tokens, usage, API key, 429 with Retry-After,
disconnects, metrics) must behave as documented in docs/edge-daemon.md.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from urllib.request import urlopen

import grpc
import httpx
import openai
import pytest
from conftest import make_client
from helpers import edge_daemon, running_server
from prometheus_client.parser import text_string_to_metric_families

from wisp_common.config import EdgeConfig
from wisp_common.models import tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_edge.chat import conversation_ids, run_chat
from wisp_edge.client import EdgeClient
from wisp_edge.drafter import CopyDrafter
from wisp_edge.openai_api import ClientPool

API_KEY = "sk-test-edge"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
PROMPT = "The sea is"


@pytest.fixture(scope="module")
def server(tiny_pair):
    """Two sessions at most, so that the server itself can be filled; contexts long enough to hold a stream open."""
    options = dict(engine="hf", metrics_port=0, max_sessions=2, max_context_tokens=2048, profile_estimator=False)
    with running_server(tiny_pair[0], **options) as s:
        yield s


@pytest.fixture(scope="module")
def notify_socket(tmp_path_factory) -> Iterator[socket.socket]:
    """systemd's side of a `Type=notify` unit: the datagram socket the daemon reports READY=1 to."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path_factory.mktemp("systemd") / "notify"))
        sock.settimeout(10)
        yield sock


@pytest.fixture(scope="module")
def edge(server, tiny_pair, tmp_path_factory, notify_socket):
    log = tmp_path_factory.mktemp("edge") / "serve.log"
    args = ("--max-concurrent-requests", "2", "--max-new-tokens", "32")  # default retries: a full server is 429 at once
    env = {"WISP_API_KEY": API_KEY, "NOTIFY_SOCKET": notify_socket.getsockname()}
    with edge_daemon(f"127.0.0.1:{server.port}", tiny_pair[1], log, *args, env=env) as url:
        yield url


@pytest.fixture(scope="module")
def api(edge) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{edge}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(server):
    return pb_grpc.WispStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))


def target_only(stub, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The target's own greedy answer (the server's Generate RPC: no drafts), stopping at EOS as a session does."""
    request = pb.GenerateRequest(prompt_token_ids=prompt_ids, stop=pb.StopCondition(max_new_tokens=max_new_tokens))
    return [t for r in stub.Generate(request, timeout=120) for t in r.token_ids]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def edge_metrics(url: str) -> dict[tuple[str, tuple], float]:
    """The daemon's /metrics, read by Prometheus' own parser: (sample name, sorted labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def server_samples(server) -> dict[tuple[str, tuple], float]:
    text = urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def server_sessions(server) -> float:
    return server_samples(server)[("wisp_sessions_active", ())]


def server_full_refusals(server) -> float:
    return server_samples(server).get(("wisp_refused_requests_total", (("code", "RESOURCE_EXHAUSTED"),)), 0.0)


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def check_spec_decode(metrics: dict) -> dict:
    """vLLM's per-request shape (`metrics.speculative_decoding`), consistent the way AIPerf checks it."""
    figures = metrics["speculative_decoding"]
    steps, accepted, drafted = figures["num_spec_steps"], figures["per_step_accepted"], figures["per_step_drafted"]
    histogram, per_pos = figures["acceptance_histogram"], figures["num_accepted_tokens_per_pos"]
    assert steps > 0 and figures["num_draft_tokens"] >= figures["num_accepted_draft_tokens"] > 0
    assert len(accepted) == len(drafted) == steps == sum(histogram)
    assert sum(accepted) == sum(j * n for j, n in enumerate(histogram)) == sum(per_pos)
    assert sum(accepted) == figures["num_accepted_draft_tokens"] and sum(drafted) == figures["num_draft_tokens"]
    assert len(histogram) == figures["num_spec_tokens"] + 1 and all(a <= d for a, d in zip(accepted, drafted))
    assert figures["mean_acceptance_length"] == pytest.approx(1 + sum(accepted) / steps)
    assert all(a >= b for a, b in zip([steps, *per_pos], per_pos))
    return figures


def test_streamed_chat_is_the_targets_own_answer(api, stub, smollm2_tokenizer):
    expected = target_only(stub, conversation_ids(smollm2_tokenizer, MESSAGES), 40)
    chunks = list(
        api.chat.completions.create(
            model="any",
            messages=MESSAGES,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == decode(smollm2_tokenizer, expected)
    last, usage = chunks[-2], chunks[-1]
    assert last.choices[0].finish_reason == ("length" if len(expected) == 40 else "stop")
    check_spec_decode(last.model_extra["metrics"])
    assert usage.choices == [] and usage.usage.completion_tokens == len(expected)
    assert usage.usage.prompt_tokens == len(conversation_ids(smollm2_tokenizer, MESSAGES))


def test_completion_reports_usage_and_stops_at_max_tokens(api, stub, smollm2_tokenizer):
    prompt_ids = smollm2_tokenizer.encode(PROMPT)
    expected = target_only(stub, prompt_ids, 12)
    assert len(expected) == 12  # no EOS early: the length limit is what stops it
    answer = api.completions.create(model="any", prompt=PROMPT, max_tokens=12, temperature=0)
    assert answer.choices[0].text == decode(smollm2_tokenizer, expected)
    assert answer.choices[0].finish_reason == "length"
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), 12)
    assert usage.total_tokens == len(prompt_ids) + 12
    check_spec_decode(answer.model_extra["metrics"])


def test_stop_strings_cut_the_text_before_them_streamed_or_not(api, stub, smollm2_tokenizer, server):
    full = decode(smollm2_tokenizer, target_only(stub, smollm2_tokenizer.encode(PROMPT), 40))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    answer = api.completions.create(model="any", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "\x00"])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected, "stop")
    assert answer.usage.completion_tokens < 40
    stream = api.completions.create(model="any", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert wait_for(lambda: server_sessions(server) == 0, 1.0)  # the session was closed on the stop string


def test_a_wrong_or_missing_api_key_is_refused_with_401(edge):
    wrong = openai.OpenAI(base_url=f"{edge}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401
    missing = httpx.post(f"{edge}/v1/completions", json={"prompt": PROMPT}, timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{edge}/health", timeout=10).status_code == 200  # health and metrics need no key


def test_health_and_models(api, edge, tiny_pair, notify_socket):
    assert notify_socket.recv(256) == b"READY=1"  # told systemd once it listened
    health = httpx.get(f"{edge}/health", timeout=10).json()
    assert health == {"status": "ok", "requests_running": 0, "max_concurrent_requests": 2}
    assert [m.id for m in api.models.list().data] == [tiny_pair[0]]  # the server's target


def test_bad_requests_get_openai_error_json(edge):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    bad = httpx.post(f"{edge}/v1/chat/completions", json={"messages": []}, headers=headers, timeout=10)
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["type"] == "invalid_request_error" and "messages" in error["message"]


def hold_streams(edge: str, count: int) -> list:
    """``count`` streamed requests long enough to stay open while the test runs; each waits for its first event."""
    client = httpx.Client(base_url=edge, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    body = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "stream": True}
    held = []
    for _ in range(count):
        response = client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
        assert response.status_code == 200
        held.append(response)
    return held


def test_a_full_edge_answers_429_with_retry_after(api, edge, server):
    held = hold_streams(edge, 2)  # --max-concurrent-requests 2
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            api.completions.create(model="any", prompt=PROMPT, max_tokens=4)
        assert caught.value.response.headers["retry-after"] == "1"
        assert "2 concurrent requests" in caught.value.body["message"]
    finally:
        for response in held:
            response.close()
    assert wait_for(lambda: server_sessions(server) == 0, 1.0)
    assert edge_metrics(edge)[("wisp_edge_requests_rejected_total", (("reason", "edge_full"),))] >= 1


def test_a_full_server_answers_429_too(api, edge, server, stub, smollm2_tokenizer):
    """The server's own RESOURCE_EXHAUSTED (its two sessions held open elsewhere) becomes 429 on the edge at once:
    the daemon does not retry it first (its HTTP client decides whether to wait)."""
    release = threading.Event()
    identity = pb.ModelIdentity(name="probe", tokenizer_fingerprint=tokenizer_fingerprint(smollm2_tokenizer))
    opening = pb.SpeculateRequest(open=pb.OpenSession(draft_model=identity, prompt_token_ids=[1, 2, 3]))

    def requests():
        yield opening
        release.wait()

    held = [stub.Speculate(requests()) for _ in range(2)]
    try:
        for responses in held:
            next(responses)  # opened
        refusals = server_full_refusals(server)
        with pytest.raises(openai.RateLimitError) as caught:
            api.chat.completions.create(model="any", messages=MESSAGES, max_tokens=4)
        assert int(caught.value.response.headers["retry-after"]) >= 1  # the server's hint, in whole seconds
        assert "verification server is full" in caught.value.body["message"]
        assert server_full_refusals(server) == refusals + 1
    finally:
        release.set()
        for responses in held:
            responses.cancel()
    assert wait_for(lambda: server_sessions(server) == 0, 2.0)


def test_a_client_that_leaves_mid_stream_closes_its_server_session_at_once(edge, server):
    before = edge_metrics(edge)
    (response,) = hold_streams(edge, 1)
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    assert server_sessions(server) == 1
    response.close()
    assert wait_for(lambda: server_sessions(server) == 0, 1.0)
    cancelled = ("wisp_edge_requests_total", (("endpoint", "completions"), ("outcome", "cancelled")))
    assert wait_for(lambda: edge_metrics(edge).get(cancelled, 0) == before.get(cancelled, 0) + 1, 1.0)
    assert edge_metrics(edge)[("wisp_edge_requests_running", ())] == 0


def test_metrics_agree_with_the_answers(api, edge):
    before = edge_metrics(edge)
    answer = api.completions.create(model="any", prompt=PROMPT, max_tokens=16, temperature=0)
    after = edge_metrics(edge)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    spec = check_spec_decode(answer.model_extra["metrics"])
    assert delta("wisp_edge_requests_total", endpoint="completions", outcome="length") == 1
    assert delta("wisp_edge_prompt_tokens_total") == answer.usage.prompt_tokens
    assert delta("wisp_edge_generation_tokens_total") == answer.usage.completion_tokens == 16
    assert delta("wisp_edge_time_to_first_token_seconds_count") == 1
    assert delta("wisp_edge_time_per_output_token_seconds_count") == 1
    assert delta("wisp_edge_rounds_total") >= spec["num_spec_steps"]
    assert delta("wisp_edge_spec_decode_num_drafts_total") == spec["num_spec_steps"]
    assert delta("wisp_edge_spec_decode_num_draft_tokens_total") == spec["num_draft_tokens"]
    assert delta("wisp_edge_spec_decode_num_accepted_tokens_total") == spec["num_accepted_draft_tokens"]
    for position, accepted in enumerate(spec["num_accepted_tokens_per_pos"]):
        assert delta("wisp_edge_spec_decode_num_accepted_tokens_per_pos_total", position=str(position)) == accepted


def test_chat_keeps_the_history_and_ends_on_end_of_input(server, stub, tiny_pair, smollm2_tokenizer):
    client = make_client(f"127.0.0.1:{server.port}", tiny_pair[1], smollm2_tokenizer)
    config = EdgeConfig(max_new_tokens=10)
    lines = iter(["Hello there.", "", "And then?"])  # an empty line is skipped
    shown: list[str] = []
    assert run_chat(client, smollm2_tokenizer, config, read_line=lambda _: _next_or_eof(lines), write=shown.append) == 0

    def answer(history: list[dict[str, str]]) -> str:
        return decode(smollm2_tokenizer, target_only(stub, conversation_ids(smollm2_tokenizer, history), 10))

    first = answer([user("Hello there.")])
    second = answer([user("Hello there."), {"role": "assistant", "content": first}, user("And then?")])
    assert "".join(shown) == f"{first}\n{second}\n\n"


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _next_or_eof(lines: Iterator[str]) -> str:
    line = next(lines, None)
    if line is None:
        raise EOFError
    return line


@pytest.mark.slow
def test_real_models_serve_and_chat(tmp_path):
    """The default target and draft: a streamed chat answer equals the target's, and `wisp-edge chat` answers too."""
    from wisp_common.models import load_tokenizer
    from wisp_server.launcher import ServerProcess

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    messages = [user("What is the capital of France?")]
    args = ["--target-model", "smollm2-135m-instruct", "--engine", "hf", "--dtype", "float32", "--no-profile-estimator"]
    with ServerProcess(args, log_prefix=None) as process:
        expected = target_only(
            pb_grpc.WispStub(grpc.insecure_channel(process.address)), conversation_ids(tokenizer, messages), 24
        )
        with edge_daemon(process.address, "smollm2-135m-wisp-draft", tmp_path / "serve.log") as url:
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
            stream = api.chat.completions.create(model="any", messages=messages, max_tokens=24, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream)
        assert text == decode(tokenizer, expected) and "Paris" in text
        chat = subprocess.run(
            [sys.executable, "-m", "wisp_edge.cli", "chat", "--server", process.address, "--max-new-tokens", "24"],
            input="What is the capital of France?\n",
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert chat.returncode == 0, chat.stderr
        assert text in chat.stdout  # the same answer, from the terminal chat


def test_a_conversation_s_next_turn_goes_to_the_client_that_holds_its_history(smollm2_tokenizer):
    """Its drafter state (the target features of the earlier turns) is reused, also by the same prompt again;
    another conversation, which shares only the system prompt, takes the least recently used client and leaves that
    history alone."""
    clients = [EdgeClient(grpc.insecure_channel("127.0.0.1:1"), CopyDrafter(), pb.ModelIdentity()) for _ in range(3)]
    pool = ClientPool(clients)
    first = [user("Tell me about the sea.")]
    turn = conversation_ids(smollm2_tokenizer, first)
    holder = pool.take(turn)
    holder.drafter.start(turn + smollm2_tokenizer.encode("The sea is wide.<|im_end|>"))
    pool.give_back(holder)
    other = pool.take(conversation_ids(smollm2_tokenizer, [user("Name a colour.")]))
    assert holder is clients[0] and other is clients[1]  # the least recently used, not the history's holder
    follow_up = [*first, {"role": "assistant", "content": "The sea is wide."}, user("And deep?")]
    second_turn = conversation_ids(smollm2_tokenizer, follow_up)
    assert pool.take(second_turn) is holder
    holder.drafter.start(second_turn)
    pool.give_back(holder)
    assert pool.take(second_turn) is holder  # the same prompt again (a regenerate, a retry)
    assert pool.take([1, 2, 3]) is clients[2] and pool.take([4]) is None and pool.busy == 3


def test_incremental_text_never_releases_part_of_a_stop_string(smollm2_tokenizer):
    """Fed one token at a time, the text comes out whole, cut before the stop string, none of it sent early."""
    from wisp_edge.detokenize import IncrementalText

    ids = smollm2_tokenizer.encode("Café au lait, then STOP here; more after.")
    text = IncrementalText(smollm2_tokenizer, stop=["STOP h", "never"])
    pieces = [text.add([token]) for token in ids] + [text.flush()]
    assert "".join(pieces) == "Café au lait, then " and text.stopped
    assert not any("S" in piece for piece in pieces)
    plain = IncrementalText(smollm2_tokenizer)
    assert (
        "".join([plain.add([token]) for token in ids] + [plain.flush()]) == "Café au lait, then STOP here; more after."
    )
