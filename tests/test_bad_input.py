"""Bad input over real loopback sockets: each case gets its own status and a message that says what to fix, and
the server goes on serving: after every refusal a drafted session on the same server generates exactly what the
target alone would.

The cases already refused in tests/test_grpc_service.py (wrong tokenizer, draft before open, too many drafts,
positions or token ids that do not fit, a prompt over max_context_tokens, an empty prompt, a second open) and the
rate limits in tests/test_security.py are not repeated here; docs/reliability.md has the whole table.
"""

from __future__ import annotations

import math
import time

import grpc
import pytest
from conftest import SMOLLM2_VOCAB, make_client
from helpers import reference_greedy, running_server

from wisp_common.models import load_causal_lm, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_edge.client import EdgeClient

PROMPT = [1, 504, 3458, 282, 4649, 314, 5465, 47]
MAX_MESSAGE_BYTES = 4 << 20  # a 1M-token prompt of small ids fits; 2M tokens of large ids do not


@pytest.fixture(scope="module")
def server(tiny_pair):
    """A server with a deliberately small receive limit (the default, 64 MiB, is sized for features)."""
    with running_server(
        tiny_pair[0], engine="hf", profile_estimator=False, grpc_max_message_bytes=MAX_MESSAGE_BYTES
    ) as running:
        yield running, f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def channel(server) -> grpc.Channel:
    return grpc.insecure_channel(server[1])


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.WispStub:
    return pb_grpc.WispStub(channel)


@pytest.fixture(scope="module")
def good_client(server, tiny_pair, smollm2_tokenizer) -> EdgeClient:
    return make_client(server[1], tiny_pair[1], smollm2_tokenizer)


@pytest.fixture(scope="module")
def reference(tiny_pair) -> list[int]:
    return reference_greedy(load_causal_lm(tiny_pair[0]), PROMPT, 24)


def open_request(tokenizer, prompt: list[int] = PROMPT, **fields) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(
        open=pb.OpenSession(
            draft_model=pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)),
            prompt_token_ids=prompt,
            stop=pb.StopCondition(max_new_tokens=8, ignore_eos=True),
            **fields,
        )
    )


def refusal(call, *args) -> grpc.RpcError:
    """The error a call ends with, its streamed responses read to the end."""
    with pytest.raises(grpc.RpcError) as caught:
        list(call(*args, timeout=30))
    return caught.value


def assert_still_serving(client: EdgeClient, reference: list[int]) -> None:
    """Another session, drafted, on the same server: token for token the target's own output."""
    result = client.generate(PROMPT, max_new_tokens=len(reference), ignore_eos=True)
    assert result.token_ids == reference


def test_a_message_over_the_receive_limit_is_resource_exhausted(stub, smollm2_tokenizer, good_client, reference):
    """gRPC itself refuses it before any of it is parsed; its message names both sizes."""
    request = open_request(smollm2_tokenizer, prompt=[40_000] * 2_000_000)  # 3 bytes a token: 6 MB
    assert request.ByteSize() > MAX_MESSAGE_BYTES
    error = refusal(stub.Speculate, iter([request]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"larger than max ({request.ByteSize()} vs. {MAX_MESSAGE_BYTES})" in error.details()
    assert_still_serving(good_client, reference)


def test_a_million_token_prompt_is_refused_before_it_is_read(stub, smollm2_tokenizer, good_client, reference):
    """Within the message limit, a prompt far over max_context_tokens is refused on its length alone: its
    out-of-vocabulary id is never looked at, and no session, engine state or batch is made for it."""
    prompt = [5] * 1_000_000 + [SMOLLM2_VOCAB]
    request = open_request(smollm2_tokenizer, prompt=prompt)
    assert request.ByteSize() < MAX_MESSAGE_BYTES
    started = time.monotonic()
    error = refusal(stub.Speculate, iter([request]))
    assert time.monotonic() - started < 5
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context of 1000001 tokens" in error.details() and "max_context_tokens=256; shorten the prompt" in (
        error.details()
    )
    assert_still_serving(good_client, reference)


@pytest.mark.parametrize(
    ("sampling", "words"),
    [
        (pb.SamplingParams(temperature=-0.5), "temperature -0.5 must be 0 (greedy) or finite and at least 1e-05"),
        (pb.SamplingParams(temperature=math.nan), "temperature nan must be 0 (greedy)"),
        (pb.SamplingParams(temperature=math.inf), "temperature inf must be 0 (greedy)"),
        (pb.SamplingParams(temperature=1e-30), "at least 1e-05"),  # logits / temperature overflow
        (pb.SamplingParams(temperature=1, top_p=-0.5), "top_p -0.5 must be in (0, 1]"),
        (pb.SamplingParams(temperature=1, top_p=1.5), "top_p 1.5 must be in (0, 1]"),
        (pb.SamplingParams(temperature=1, top_p=math.nan), "top_p nan must be in (0, 1]"),
        (pb.SamplingParams(temperature=1, top_k=SMOLLM2_VOCAB + 1), "exceeds the target's vocabulary of 49152"),
    ],
    ids=["negative-temperature", "nan-temperature", "inf-temperature", "tiny-temperature", "negative-top-p",
         "top-p-over-1", "nan-top-p", "top-k-over-vocab"],
)  # fmt: skip
def test_invalid_sampling_parameters_are_invalid_argument(
    stub, smollm2_tokenizer, good_client, reference, sampling, words
):
    """Refused at `open`: before the fix a NaN or tiny temperature failed the whole batch with INTERNAL."""
    messages = [
        open_request(smollm2_tokenizer, sampling=sampling),
        pb.SpeculateRequest(draft=pb.DraftRound(position=8)),
    ]
    error = refusal(stub.Speculate, iter(messages))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("invalid sampling parameters: ") and words in error.details()
    assert_still_serving(good_client, reference)


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
def test_an_slo_that_is_no_duration_is_invalid_argument(stub, smollm2_tokenizer, good_client, reference, seconds):
    """It would turn the session's deadlines, by which the scheduler orders batches, into NaN or nonsense."""
    error = refusal(stub.Speculate, iter([open_request(smollm2_tokenizer, slo=pb.Slo(tpot_seconds=seconds))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"invalid SLO: tpot_seconds {seconds:g} must be finite and at least 0 seconds" in error.details()
    assert_still_serving(good_client, reference)


def test_more_known_features_than_context_positions_is_invalid_argument(
    stub, smollm2_tokenizer, good_client, reference
):
    request = open_request(smollm2_tokenizer, return_features=True, known_features=len(PROMPT) + 1)
    error = refusal(stub.Speculate, iter([request]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"known_features={len(PROMPT) + 1} is more than the context's {len(PROMPT)} positions" in error.details()
    assert_still_serving(good_client, reference)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"return_features": True, "feature_layers": [1]}, "feature_layers [1]: the target's decoder layers below its"),
        ({"return_features": True, "feature_layers": [0, 0]}, "feature_layers [0, 0]: at most 4 distinct decoder"),
        ({"feature_layers": [0]}, "feature_layers come with the features: set return_features too"),
    ],
)
def test_feature_layers_the_target_cannot_give_are_invalid_argument(
    stub, smollm2_tokenizer, good_client, reference, fields, message
):
    """The target has 2 decoder layers: layer 1 is its top one, whose output is the feature itself."""
    error = refusal(stub.Speculate, iter([open_request(smollm2_tokenizer, **fields)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert_still_serving(good_client, reference)


def test_a_request_that_sets_nothing_is_invalid_argument(stub, smollm2_tokenizer, good_client, reference):
    error = refusal(stub.Speculate, iter([open_request(smollm2_tokenizer), pb.SpeculateRequest()]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sets none of `open`, `draft` or `close`; set exactly one" in error.details()
    assert_still_serving(good_client, reference)


@pytest.mark.parametrize("method", ["Speculate", "Generate", "GetServerInfo"])
def test_bytes_that_are_no_message_are_invalid_argument(channel, good_client, reference, method):
    """gRPC answers a request it cannot parse with INTERNAL; the server says INVALID_ARGUMENT, and why."""
    path = f"/wisp.v1.Wisp/{method}"
    raw = {"Speculate": channel.stream_stream, "Generate": channel.unary_stream, "GetServerInfo": channel.unary_unary}
    call = raw[method](path, request_serializer=bytes, response_deserializer=bytes)
    garbage = b"\x0a\x05\xff\xfe"  # field 1, 5 bytes long, then only 2
    with pytest.raises(grpc.RpcError) as caught:
        result = call(iter([garbage]) if method == "Speculate" else garbage, timeout=30)
        if method != "GetServerInfo":
            list(result)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid wisp.v1 message" in caught.value.details()
    assert "send messages built from wisp.proto" in caught.value.details()
    assert_still_serving(good_client, reference)
