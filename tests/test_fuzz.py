"""Fuzzing the Speculate stream of a live server over loopback.

Hypothesis makes request streams (open, draft, close and empty messages in any order, with any field values:
token ids in and out of the vocabulary, wrong positions, NaN and infinite sampling parameters and SLOs, long
repeated fields), valid sessions with any sampling parameters, SLO and stop condition, and mutates the bytes of
a recorded valid stream. Whatever it sends, the server must answer with a deliberate status: UNKNOWN or INTERNAL
(an exception that escaped), a stream that hangs, an ERROR in the server's log or an exception on one of its
threads fails the example, and so does a valid session that the server does not serve exactly as the target
would afterwards. Derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator

import grpc
import pytest
from conftest import SMOLLM2_VOCAB
from helpers import reference_greedy, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wisp_common.models import load_causal_lm, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc

PROMPT = [1, 504, 3458, 282, 4649, 314, 5465, 47]
MAX_CONTEXT = 48  # short sessions, so a server that decodes on its own finishes fast
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
BUGS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


class Problems(logging.Handler):
    """ERROR records of the server's and gRPC's loggers, and exceptions that end one of the server's threads."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.found.append(self.format(record))

    def thread_died(self, args: threading.ExceptHookArgs) -> None:
        self.found.append(f"thread {args.thread.name if args.thread else '?'} died: {args.exc_value!r}")


@pytest.fixture(scope="module")
def problems() -> Iterator[Problems]:
    handler = Problems()
    loggers = [logging.getLogger(name) for name in ("wisp_server", "grpc")]
    for logger in loggers:
        logger.addHandler(handler)
    hook, threading.excepthook = threading.excepthook, handler.thread_died
    yield handler
    threading.excepthook = hook
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def server(tiny_pair, problems) -> Iterator[str]:
    with running_server(
        tiny_pair[0], engine="hf", profile_estimator=False, max_context_tokens=MAX_CONTEXT, max_sessions=8
    ) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def channel(server) -> grpc.Channel:
    return grpc.insecure_channel(server)


@pytest.fixture(scope="module")
def fingerprint(smollm2_tokenizer) -> str:
    return tokenizer_fingerprint(smollm2_tokenizer)


@pytest.fixture(scope="module")
def reference(tiny_pair) -> list[int]:
    return reference_greedy(load_causal_lm(tiny_pair[0]), PROMPT, 3)


# --- what to send -----------------------------------------------------------------------------------------------

UINT32 = st.integers(0, 2**32 - 1)
IN_VOCAB = st.integers(0, SMOLLM2_VOCAB - 1)
TOKEN = IN_VOCAB | st.sampled_from([SMOLLM2_VOCAB, 2**32 - 1]) | UINT32
NASTY_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 1e-40, 1e-30, 2.0, 1e30]  # subnormal, overflowing
ANY_FLOAT = st.sampled_from(NASTY_FLOATS) | st.floats(width=32)
SMALL_OR_ANY = st.integers(0, 12) | UINT32


def valid_open(fingerprint: str, **fields) -> pb.OpenSession:
    return pb.OpenSession(
        draft_model=pb.ModelIdentity(name="draft", tokenizer_fingerprint=fingerprint),
        prompt_token_ids=PROMPT,
        stop=pb.StopCondition(max_new_tokens=3, ignore_eos=True),
        **fields,
    )


# One odd field in an otherwise valid message reaches the most code; "all": every field may be odd.
OPEN_FIELDS = ["none", "all", "fingerprint", "target", "prompt", "committed", "temperature", "top_p", "top_k"]
OPEN_FIELDS += ["max_new_tokens", "ttft", "tpot"]
DRAFT_FIELDS = ["none", "none", "drafts", "position", "round"]


def open_session(fingerprint: str, odd: str) -> st.SearchStrategy[pb.OpenSession]:
    """Open messages valid but for the field ``odd`` ("all": any field may be odd, "none": all valid)."""

    def field(name: str, usual: st.SearchStrategy, unusual: st.SearchStrategy) -> st.SearchStrategy:
        return unusual if odd in (name, "all") else usual

    identity = st.builds(
        pb.ModelIdentity,
        name=st.text(max_size=8),
        tokenizer_fingerprint=field("fingerprint", st.just(fingerprint), st.text(max_size=8)),
        vocab_size=UINT32,
        target_fingerprint=field("target", st.just(""), st.text(max_size=8)),
    )
    sampling = st.builds(
        pb.SamplingParams,
        temperature=field("temperature", st.just(0.0) | st.floats(0.1, 4.0), ANY_FLOAT),
        top_p=field("top_p", st.just(0.0) | st.floats(0.05, 1.0), ANY_FLOAT),
        top_k=field("top_k", st.just(0) | st.integers(1, 100), UINT32),
        seed=st.integers(0, 2**64 - 1),
    )
    stop = st.builds(
        pb.StopCondition,
        max_new_tokens=field("max_new_tokens", st.integers(1, 6), st.just(0) | UINT32),
        stop_token_ids=st.lists(TOKEN, max_size=8),
        ignore_eos=st.booleans(),
    )
    slo = st.builds(
        pb.Slo,
        ttft_seconds=field("ttft", st.just(0.0) | st.floats(0.0, 10.0), ANY_FLOAT),
        tpot_seconds=field("tpot", st.just(0.0) | st.floats(0.0, 1.0), ANY_FLOAT),
    )
    return st.builds(
        pb.OpenSession,
        draft_model=identity,
        prompt_token_ids=field(
            "prompt", st.just(PROMPT) | st.lists(IN_VOCAB, min_size=1, max_size=MAX_CONTEXT - 1), st.lists(TOKEN)
        ),
        committed_token_ids=field("committed", st.just([]) | st.lists(IN_VOCAB, max_size=12), st.lists(TOKEN)),
        sampling=sampling,
        stop=stop,
        slo=slo,
        device=st.builds(pb.DeviceInfo, device_id=st.text(max_size=8), kind=st.text(max_size=8)),
        return_features=st.booleans(),
        accept_server_decoding=st.booleans(),
        server_paced=st.booleans(),
        known_features=st.integers(0, MAX_CONTEXT) | UINT32,
    )


@st.composite
def streams(draw: st.DrawFn, opens: st.SearchStrategy[pb.OpenSession]) -> list[pb.SpeculateRequest]:
    """Mostly an open first, then messages of any kind; draft positions mostly the ones an edge would send."""
    messages: list[pb.SpeculateRequest] = []
    context = 0
    kinds = st.sampled_from(["draft"] * 4 + ["open", "close", "empty"])
    for index in range(draw(st.integers(1, 5))):
        kind = draw(kinds if index else st.sampled_from(["open"] * 9 + ["draft"]))
        if kind == "open":
            session = draw(opens)
            context = len(session.prompt_token_ids) + len(session.committed_token_ids)
            messages.append(pb.SpeculateRequest(open=session))
        elif kind == "draft":
            odd = draw(st.sampled_from(DRAFT_FIELDS))
            drafts = draw(st.lists(TOKEN, max_size=12) if odd == "drafts" else st.lists(IN_VOCAB, max_size=6))
            position = draw(SMALL_OR_ANY if odd == "position" else st.just(context))
            round_number = draw(st.just(2**32 - 1) | UINT32 if odd == "round" else st.just(max(index - 1, 0)))
            messages.append(
                pb.SpeculateRequest(draft=pb.DraftRound(round=round_number, position=position, token_ids=drafts))
            )
            context += 1 + len(drafts)  # as if all were accepted: right for empty drafts
        else:
            messages.append(pb.SpeculateRequest(close=pb.CloseSession()) if kind == "close" else pb.SpeculateRequest())
    return messages


def recorded_stream(fingerprint: str, reference: list[int]) -> list[bytes]:
    """A valid stream as bytes: open, a target-only round, a round of a right and a wrong draft, close."""
    open_msg = valid_open(fingerprint, sampling=pb.SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=7))
    open_msg.slo.CopyFrom(pb.Slo(ttft_seconds=1.0, tpot_seconds=0.1))
    open_msg.stop.stop_token_ids.extend([2, 3])
    open_msg.device.CopyFrom(pb.DeviceInfo(device_id="edge-1", kind="laptop"))
    messages = [
        pb.SpeculateRequest(open=open_msg),
        pb.SpeculateRequest(draft=pb.DraftRound(round=0, position=len(PROMPT))),
        pb.SpeculateRequest(draft=pb.DraftRound(round=1, position=len(PROMPT) + 1, token_ids=[reference[1], 17])),
        pb.SpeculateRequest(close=pb.CloseSession()),
    ]
    return [m.SerializeToString() for m in messages]


@st.composite
def mutated(draw: st.DrawFn, stream: list[bytes]) -> list[bytes]:
    """The stream with a few of its messages' bytes flipped, replaced, cut or inserted."""
    messages = list(stream)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(messages) - 1))
        data = bytearray(messages[index])
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["flip", "byte", "cut", "insert"]))
        if edit == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        messages[index] = bytes(data)
    return messages


# --- the checks -------------------------------------------------------------------------------------------------


def outcome(responses) -> grpc.StatusCode:
    """How a stream ended: OK, or the status it was refused with."""
    try:
        for _ in responses:
            pass
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def assert_handled(code: grpc.StatusCode, problems: Problems, channel: grpc.Channel, fingerprint: str, reference):
    """No escaped exception and no hang; and a valid session right after is served as the target alone would."""
    assert code not in BUGS | {grpc.StatusCode.DEADLINE_EXCEEDED}, code
    stub = pb_grpc.WispStub(channel)
    session = [
        pb.SpeculateRequest(open=valid_open(fingerprint)),
        pb.SpeculateRequest(draft=pb.DraftRound(position=len(PROMPT), token_ids=reference[:2])),
    ]
    responses = list(stub.Speculate(iter(session), timeout=30))
    verdict = responses[1].verdict
    assert (verdict.num_accepted, verdict.next_token, verdict.finished) == (2, reference[2], True)
    assert not problems.found, problems.found


def test_generated_streams_get_a_deliberate_status(channel, problems, fingerprint, reference):
    stub = pb_grpc.WispStub(channel)
    opens = st.one_of([open_session(fingerprint, odd) for odd in OPEN_FIELDS])  # made once: making them is slow

    @FUZZ
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        problems.found.clear()  # each example answers for its own
        messages = data.draw(streams(opens))
        code = outcome(stub.Speculate(iter(messages), timeout=30))
        assert_handled(code, problems, channel, fingerprint, reference)

    run()


@st.composite
def parameterized_sessions(draw: st.DrawFn, fingerprint: str) -> list[pb.SpeculateRequest]:
    """A valid session but for its sampling parameters, SLO and stop condition, all drawn at will, and the
    round an edge would send: what the stream fuzzer rarely reaches, a round verified with odd parameters."""
    open_msg = valid_open(
        fingerprint,
        sampling=pb.SamplingParams(
            temperature=draw(ANY_FLOAT), top_p=draw(ANY_FLOAT), top_k=draw(UINT32), seed=draw(st.integers(0, 2**64 - 1))
        ),
        slo=pb.Slo(ttft_seconds=draw(ANY_FLOAT), tpot_seconds=draw(ANY_FLOAT)),
        accept_server_decoding=draw(st.booleans()),
        return_features=draw(st.booleans()),
        server_paced=draw(st.booleans()),
        known_features=draw(st.integers(0, MAX_CONTEXT) | UINT32),
    )
    open_msg.stop.CopyFrom(
        pb.StopCondition(
            max_new_tokens=draw(st.integers(1, 6) | UINT32),
            stop_token_ids=draw(st.lists(TOKEN, max_size=8)),
            ignore_eos=draw(st.booleans()),
        )
    )
    drafts = draw(st.lists(IN_VOCAB, max_size=6))
    return [
        pb.SpeculateRequest(open=open_msg),
        pb.SpeculateRequest(draft=pb.DraftRound(position=len(PROMPT), token_ids=drafts)),
    ]


def test_sessions_with_any_parameters_get_a_deliberate_status(channel, problems, fingerprint, reference):
    stub = pb_grpc.WispStub(channel)

    @FUZZ
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        problems.found.clear()  # each example answers for its own
        code = outcome(stub.Speculate(iter(data.draw(parameterized_sessions(fingerprint))), timeout=30))
        assert_handled(code, problems, channel, fingerprint, reference)

    run()


def test_mutated_valid_streams_get_a_deliberate_status(channel, problems, fingerprint, reference):
    raw = channel.stream_stream("/wisp.v1.Wisp/Speculate", request_serializer=bytes, response_deserializer=bytes)
    stream = recorded_stream(fingerprint, reference)
    assert outcome(raw(iter(stream), timeout=30)) == grpc.StatusCode.OK  # unmutated, it is valid

    @FUZZ
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        problems.found.clear()  # each example answers for its own
        code = outcome(raw(iter(data.draw(mutated(stream))), timeout=30))
        assert_handled(code, problems, channel, fingerprint, reference)

    run()
