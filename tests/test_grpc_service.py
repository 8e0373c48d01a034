"""The gRPC contract over real loopback sockets, with tiny models and the real tokenizer.

Bad requests get a precise status and message, and never disturb the other
sessions that the server is serving at the same time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from urllib.request import urlopen

import grpc
import pytest
from conftest import make_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import reference_greedy
from prometheus_client.parser import text_string_to_metric_families

from wisp_common.models import load_causal_lm, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc

PROMPT = [1, 504, 3458, 282, 4649, 314, 5465, 47]


@pytest.fixture(scope="module")
def target_model(tiny_pair):
    return load_causal_lm(tiny_pair[0])


@pytest.fixture(scope="module")
def stub(tiny_server):
    return pb_grpc.WispStub(grpc.insecure_channel(tiny_server[1]))


def open_request(tokenizer, prompt=PROMPT, fingerprint=None, **stop) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(
        open=pb.OpenSession(
            draft_model=pb.ModelIdentity(
                name="draft", tokenizer_fingerprint=fingerprint or tokenizer_fingerprint(tokenizer)
            ),
            prompt_token_ids=prompt,
            stop=pb.StopCondition(max_new_tokens=stop.get("max_new_tokens", 16), ignore_eos=True),
        )
    )


def draft_request(position: int, tokens: list[int]) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(draft=pb.DraftRound(position=position, token_ids=tokens))


def open_paced(stub, tokenizer, max_new_tokens: int) -> tuple[queue.Queue, Iterator[pb.SpeculateResponse]]:
    """A server-paced session, opened: the queue its requests go to (None ends them) and its responses."""
    opening = open_request(tokenizer, max_new_tokens=max_new_tokens)
    opening.open.server_paced = True
    requests: queue.Queue = queue.Queue()
    responses = stub.Speculate(iter(requests.get, None), timeout=30)
    requests.put(opening)
    assert next(responses).HasField("opened")
    return requests, responses


def paced_verdicts(responses: Iterator[pb.SpeculateResponse]) -> Iterator[tuple[pb.Verdict, list[int]]]:
    """A server-paced session's verdicts, each with the tokens committed so far (one list, grown in place)."""
    committed: list[int] = []
    for verdict in (r.verdict for r in responses):
        committed += [*verdict.accepted_token_ids, *([verdict.next_token] if verdict.HasField("next_token") else [])]
        yield verdict, committed


def call(stub, messages) -> list[pb.SpeculateResponse]:
    return list(stub.Speculate(iter(messages), timeout=30))


def generated(stub, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The tokens of a whole Generate stream (target-only decoding)."""
    request = pb.GenerateRequest(
        prompt_token_ids=prompt, stop=pb.StopCondition(max_new_tokens=max_new_tokens, ignore_eos=True)
    )
    return [t for r in stub.Generate(request, timeout=60) for t in r.token_ids]


def scrape(server) -> dict[str, float]:
    """The server's metrics over HTTP, read by Prometheus' own parser."""
    text = urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def refused(stub, messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(stub, messages)
    return caught.value


def test_server_info_and_health(stub, tiny_server, smollm2_tokenizer):
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.target_model.tokenizer_fingerprint == tokenizer_fingerprint(smollm2_tokenizer)
    assert (info.engine, info.policy, info.max_draft_tokens, info.max_sessions) == ("hf", "wisp", 6, 4)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(tiny_server[1]))
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_a_full_session_commits_what_the_target_would(stub, smollm2_tokenizer, target_model):
    reference = reference_greedy(target_model, PROMPT, 4)
    drafts = [reference[0], reference[1], 7]  # two right, one wrong
    responses = call(stub, [open_request(smollm2_tokenizer, max_new_tokens=4), draft_request(len(PROMPT), drafts)])
    verdict = responses[1].verdict
    assert (verdict.num_accepted, verdict.next_token, verdict.position) == (2, reference[2], len(PROMPT) + 3)
    assert not verdict.finished and verdict.timings.batch_size >= 1
    responses = call(
        stub,
        [open_request(smollm2_tokenizer, max_new_tokens=2), draft_request(len(PROMPT), reference[:3])],
    )
    verdict = responses[1].verdict  # room for two tokens: one draft is verified, then the target's own
    assert (verdict.num_accepted, verdict.next_token, verdict.finished) == (1, reference[1], True)
    assert verdict.finish_reason == pb.FINISH_REASON_LENGTH


def test_features_end_before_the_newest_token_also_when_a_stop_comes_among_the_drafts(
    stub, smollm2_tokenizer, target_model
):
    """The edge places a verdict's features by that rule; kept for the conversation's next turn, a row too many
    would shift every feature after it."""
    reference = reference_greedy(target_model, PROMPT, 4)
    opening = open_request(smollm2_tokenizer)
    opening.open.return_features = True
    opening.open.stop.stop_token_ids.append(reference[1])
    responses = call(stub, [opening, draft_request(len(PROMPT), reference[:3])])
    verdict = responses[1].verdict  # the second draft is the stop token: committed, with no token of the target's
    assert (verdict.num_accepted, verdict.HasField("next_token"), verdict.finish_reason) == (
        2,
        False,
        pb.FINISH_REASON_STOP,
    )
    assert (verdict.features.position, verdict.features.rows) == (0, len(PROMPT) + 2 - 1)


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("wrong tokenizer", grpc.StatusCode.FAILED_PRECONDITION, "tokenizer mismatch"),
        ("draft before open", grpc.StatusCode.FAILED_PRECONDITION, "unknown session"),
        ("oversized draft", grpc.StatusCode.INVALID_ARGUMENT, "max_draft_tokens=6"),
        ("token id out of range", grpc.StatusCode.INVALID_ARGUMENT, "outside the target's vocabulary"),
        ("prompt id out of range", grpc.StatusCode.INVALID_ARGUMENT, "outside the target's vocabulary"),
        ("wrong position", grpc.StatusCode.FAILED_PRECONDITION, "committed tokens"),
        ("prompt too long", grpc.StatusCode.INVALID_ARGUMENT, "max_context_tokens=256"),
        ("empty prompt", grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ("second open", grpc.StatusCode.FAILED_PRECONDITION, "already open"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_status(stub, smollm2_tokenizer, target_model, case, code, words):
    """Each ends only its own stream: a session after it is served exactly as the target alone would."""
    good = open_request(smollm2_tokenizer)
    messages = {
        "wrong tokenizer": [open_request(smollm2_tokenizer, fingerprint="0123456789abcdef")],
        "draft before open": [draft_request(0, [1])],
        "oversized draft": [good, draft_request(len(PROMPT), [1] * 7)],
        "token id out of range": [good, draft_request(len(PROMPT), [1, 49152])],
        "prompt id out of range": [open_request(smollm2_tokenizer, prompt=[1, 2, 10**6])],
        "wrong position": [good, draft_request(len(PROMPT) + 1, [1])],
        "prompt too long": [open_request(smollm2_tokenizer, prompt=[1] * 256)],
        "empty prompt": [open_request(smollm2_tokenizer, prompt=[])],
        "second open": [good, good],
    }[case]
    error = refused(stub, messages)
    assert error.code() == code
    assert words in error.details()
    assert generated(stub, PROMPT, 8) == reference_greedy(target_model, PROMPT, 8)


def test_session_limit_is_resource_exhausted_and_frees_on_close(tiny_server, stub, smollm2_tokenizer):
    held = []
    for _ in range(4):  # max_sessions
        queue: list = []
        event = threading.Event()

        def requests(q=queue, e=event):
            yield open_request(smollm2_tokenizer)
            e.wait()

        responses = stub.Speculate(requests())
        next(responses)  # opened
        held.append((responses, event))
        queue.append(responses)
    error = refused(stub, [open_request(smollm2_tokenizer)])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 4 sessions" in error.details()
    for responses, event in held:
        event.set()
        list(responses)
    assert call(stub, [open_request(smollm2_tokenizer)])[0].opened.session_id  # capacity is back


def test_bad_clients_do_not_disturb_good_ones(tiny_server, tiny_pair, smollm2_tokenizer, target_model, stub):
    """Two sessions generate while a third client keeps sending bad requests."""
    prompts = [PROMPT, [1, 9690, 198, 2683, 314, 260, 3575, 30]]
    results: dict[int, list[int]] = {}

    def good(index: int) -> None:
        client = make_client(tiny_server[1], tiny_pair[1], smollm2_tokenizer)
        results[index] = client.generate(prompts[index], max_new_tokens=48, ignore_eos=True).token_ids

    def bad() -> None:
        for _ in range(10):
            refused(stub, [open_request(smollm2_tokenizer), draft_request(len(PROMPT), [49152 + 5])])

    threads = [threading.Thread(target=good, args=(i,)) for i in range(2)] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for index, prompt in enumerate(prompts):
        assert results[index] == reference_greedy(target_model, prompt, 48)


def test_generate_rpc_is_target_only_decoding(stub, target_model):
    request = pb.GenerateRequest(prompt_token_ids=PROMPT, stop=pb.StopCondition(max_new_tokens=20, ignore_eos=True))
    responses = list(stub.Generate(request, timeout=30))
    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == reference_greedy(target_model, PROMPT, 20)
    assert responses[-1].finished and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_generate_streams_share_every_step_and_a_client_that_leaves_disturbs_none(tiny_server, stub, target_model):
    """Continuous batching: concurrent Generate streams are verified together step after step.

    Each stream queues its next step before sending its token, and the engine hands the core to the
    handlers before starting a batch, so the streams never drift apart into smaller batches. A
    stream cancelled mid-way, with a step still queued, ends without disturbing the others.
    """

    def batches() -> tuple[float, float]:
        samples = scrape(tiny_server[0])
        return samples["wisp_batch_size_sum"], samples["wisp_batch_size_count"]

    prompts = [PROMPT, [1, 9690, 198, 2683, 314, 260, 3575, 30], [1, 504, 3458, 30]]  # and a leaver: 4 sessions
    results: dict[int, list[int]] = {}
    start = threading.Barrier(len(prompts) + 1)

    def decode(index: int) -> None:
        start.wait()
        results[index] = generated(stub, prompts[index], 40)

    def leave() -> None:
        request = pb.GenerateRequest(prompt_token_ids=PROMPT, stop=pb.StopCondition(max_new_tokens=200))
        start.wait()
        responses = stub.Generate(request, timeout=60)
        for _ in range(5):
            next(responses)
        responses.cancel()

    rows_before, batches_before = batches()
    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(prompts))]
    leaver = threading.Thread(target=leave)
    for t in [*threads, leaver]:
        t.start()
    for t in [*threads, leaver]:
        t.join()
    rows, count = batches()
    for index, prompt in enumerate(prompts):
        assert results[index] == reference_greedy(target_model, prompt, 40)
    # 3 x 40 steps (and the leaver's few) in about 40 batches.
    assert (rows - rows_before) / (count - batches_before) >= 2.7
    assert generated(stub, PROMPT, 8) == reference_greedy(target_model, PROMPT, 8)  # and the server serves on


def test_a_server_paced_session_verifies_the_streamed_drafts_that_fit(stub, smollm2_tokenizer, target_model):
    """Server-paced: the server decodes step after step, unasked, and each step verifies the newest streamed
    round from the first token not committed yet. A round of the target's own answer is accepted as far as the
    steps verify it; every verdict names the drafts it accepted, and the text is the target's."""
    reference = reference_greedy(target_model, PROMPT, 24)
    requests, responses = open_paced(stub, smollm2_tokenizer, max_new_tokens=24)
    verdicts = []
    for verdict, committed in paced_verdicts(responses):
        verdicts.append(verdict)
        assert verdict.position == len(PROMPT) + len(committed)
        if not verdict.finished:  # the answer from here on, as an edge with a perfect draft would stream it
            requests.put(draft_request(verdict.position, reference[len(committed) : len(committed) + 6]))
    requests.put(None)
    assert committed == reference and verdicts[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert verdicts[0].num_drafts == 0  # queued at once: no round had come
    assert sum(v.num_drafts for v in verdicts) > 0
    assert all(len(v.accepted_token_ids) == v.num_accepted <= v.num_drafts for v in verdicts)
    assert sum(v.num_accepted for v in verdicts) == sum(v.num_drafts for v in verdicts)  # every draft is right


def test_a_server_paced_step_verifies_whichever_of_the_newest_rounds_fits(stub, smollm2_tokenizer, target_model):
    """An edge streams its guess and a second guess (a branch) at the same position: each step verifies the
    newest round that fits, also where a newer one does not. The text stays the target's."""
    reference = reference_greedy(target_model, PROMPT, 24)
    requests, responses = open_paced(stub, smollm2_tokenizer, max_new_tokens=24)
    verdicts, number = [], 0
    right_rounds: dict[int, bool] = {}  # the rounds of the target's answer: whether a wrong one came after them
    for verdict, committed in paced_verdicts(responses):
        verdicts.append(verdict)
        if verdict.finished:
            break
        right = reference[len(committed) : len(committed) + 6]
        wrong = [(right[0] + 1) % 100, *right[1:]]
        right_first = len(verdicts) % 2 == 1
        for tokens in (right, wrong) if right_first else (wrong, right):
            number += 1
            if tokens is right:
                right_rounds[number] = right_first
            draft = pb.DraftRound(round=number, position=verdict.position, token_ids=tokens)
            requests.put(pb.SpeculateRequest(draft=draft))
    requests.put(None)
    assert committed == reference
    verified = [v for v in verdicts if v.num_drafts]
    assert all(v.round in right_rounds and v.num_accepted == v.num_drafts for v in verified)
    assert sum(right_rounds[v.round] for v in verified) >= 2  # verified though a round that did not fit came after


def test_a_rounds_branch_is_verified_where_its_first_guess_does_not_fit(stub, smollm2_tokenizer, target_model):
    """One message carries a guess and a second guess (`branch_token_ids`) after the same position: a step verifies
    the first where it fits, else the branch, and says which (`Verdict.branch`). An oversized branch is refused."""
    reference = reference_greedy(target_model, PROMPT, 24)
    requests, responses = open_paced(stub, smollm2_tokenizer, max_new_tokens=24)
    verdicts, right_is_branch = [], {}
    for verdict, committed in paced_verdicts(responses):
        verdicts.append(verdict)
        if verdict.finished:
            break
        right = reference[len(committed) : len(committed) + 6]
        wrong = [(right[0] + 1) % 100, *right[1:]]
        number = len(verdicts)
        right_is_branch[number] = number % 2 == 1
        guess, branch = (wrong, right) if right_is_branch[number] else (right, wrong)
        draft = pb.DraftRound(round=number, position=verdict.position, token_ids=guess, branch_token_ids=branch)
        requests.put(pb.SpeculateRequest(draft=draft))
    requests.put(None)
    assert committed == reference
    verified = [v for v in verdicts if v.num_drafts]
    assert all(v.branch == right_is_branch[v.round] and v.num_accepted == v.num_drafts for v in verified)
    assert {v.branch for v in verified} == {True, False}

    requests, responses = open_paced(stub, smollm2_tokenizer, max_new_tokens=200)
    position = next(responses).verdict.position
    requests.put(pb.SpeculateRequest(draft=pb.DraftRound(position=position, token_ids=[5], branch_token_ids=[5] * 7)))
    with pytest.raises(grpc.RpcError) as caught:
        for _ in responses:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "branch of 7 tokens" in caught.value.details()
    requests.put(None)


def test_a_streamed_round_that_no_longer_fits_is_not_verified_and_a_later_one_is_refused(stub, smollm2_tokenizer):
    """A server-paced round whose leading drafts differ from what was committed since its position is skipped
    (the step decodes alone); one that claims a position past the committed text is FAILED_PRECONDITION."""
    requests, responses = open_paced(stub, smollm2_tokenizer, max_new_tokens=200)  # running when the bad round comes
    first = next(responses).verdict
    assert first.num_drafts == 0 and first.position == len(PROMPT) + 1
    wrong = (first.next_token + 1) % 100
    requests.put(draft_request(len(PROMPT), [wrong, 5, 6]))  # its first draft is not the committed token
    verdicts = [next(responses).verdict for _ in range(3)]
    assert all(v.num_drafts == 0 and not v.accepted_token_ids for v in verdicts)
    requests.put(draft_request(len(PROMPT) + 50, [5]))
    with pytest.raises(grpc.RpcError) as caught:
        for _ in responses:
            pass
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "committed tokens" in caught.value.details()
    requests.put(None)


def test_metrics_are_real_prometheus_exposition(tiny_server, stub, smollm2_tokenizer):
    """Scraped over HTTP and read by Prometheus' own parser: counters move with the traffic."""
    before = scrape(tiny_server[0])
    call(stub, [open_request(smollm2_tokenizer, max_new_tokens=4), draft_request(len(PROMPT), [1, 2])])
    refused(stub, [open_request(smollm2_tokenizer, fingerprint="0123456789abcdef")])
    after = scrape(tiny_server[0])
    assert after["wisp_rounds_total"] >= before.get("wisp_rounds_total", 0) + 1
    assert after["wisp_draft_tokens_total"] >= before.get("wisp_draft_tokens_total", 0) + 2
    assert after["wisp_verify_seconds_count"] > before.get("wisp_verify_seconds_count", 0)
    assert after["wisp_round_overhead_seconds_count"] > before.get("wisp_round_overhead_seconds_count", 0)
    assert after["wisp_refused_requests_total"] >= 1
    assert {"wisp_sessions_active", "wisp_schedule_seconds_sum", "wisp_estimator_mape_percent"} <= set(after)
