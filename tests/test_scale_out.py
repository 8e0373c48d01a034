"""Several verification servers behind one edge configuration, over real loopback sockets.

Two in-process servers with the tiny target; edges built by `wisp_edge.connection.connect` from ``--server
a,b``. New sessions spread over both servers, each session stays on the server it started on, and every output
is exactly the target's own.
"""

from __future__ import annotations

import threading
import time
from urllib.request import urlopen

import grpc
import pytest
from helpers import reference_greedy, running_server
from prometheus_client.parser import text_string_to_metric_families

from wisp_common.config import EdgeConfig
from wisp_common.models import load_causal_lm, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_edge.client import EdgeClient
from wisp_edge.connection import BalancedChannel, connect, server_targets
from wisp_edge.drafter import ModelDrafter

PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 5465, 47],
    [1, 9690, 198, 2683, 314, 260, 3575, 30],
    [1, 504, 3458, 30],
    [1, 2683, 314, 5465, 47, 9690],
]


@pytest.fixture(scope="module")
def two_servers(tiny_pair):
    options = dict(engine="hf", metrics_port=0, profile_estimator=False)
    with running_server(tiny_pair[0], **options) as first, running_server(tiny_pair[0], **options) as second:
        yield first, second


@pytest.fixture(scope="module")
def target_model(tiny_pair):
    return load_causal_lm(tiny_pair[0])


def sample(server, name: str) -> float:
    """One unlabelled sample of the server's /metrics, read by Prometheus' own parser."""
    text = urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return values.get(name, 0.0)


def settled(channel: BalancedChannel) -> list[int]:
    """The channel's open calls once gRPC has run the done callbacks of the calls that ended (just after them)."""
    deadline = time.monotonic() + 5
    while any(channel.open_calls()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return channel.open_calls()


def addresses(servers) -> str:
    return ",".join(f"127.0.0.1:{server.port}" for server in servers)


def speculate_open(tokenizer, prompt: list[int]) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(
        open=pb.OpenSession(
            draft_model=pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)),
            prompt_token_ids=prompt,
            stop=pb.StopCondition(max_new_tokens=8, ignore_eos=True),
        )
    )


def test_the_server_option_names_one_target_or_a_list():
    assert server_targets("a:1, b:2,") == ["a:1", "b:2"]
    assert server_targets("dns:///wisp.example:50051") == ["dns:///wisp.example:50051"]
    assert server_targets("ipv4:10.0.0.1:50051,10.0.0.2:50051") == ["ipv4:10.0.0.1:50051,10.0.0.2:50051"]
    with pytest.raises(ValueError, match="--server is empty"):
        server_targets(" , ")


def test_four_edges_spread_their_sessions_over_two_servers_losslessly(
    two_servers, tiny_pair, smollm2_tokenizer, target_model
):
    """Each edge runs two sessions in turn; its balancer sends one to each server, whatever its random start."""
    before = [sample(server, "wisp_sessions_total") for server in two_servers]
    identity = pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(smollm2_tokenizer))
    results: dict[tuple[int, int], list[int]] = {}
    channels: list[BalancedChannel] = []
    errors: list[BaseException] = []

    def edge(index: int) -> None:
        try:
            channel = connect(EdgeConfig(server=addresses(two_servers)))
            channels.append(channel)
            drafter = ModelDrafter(load_causal_lm(tiny_pair[1]))
            client = EdgeClient(channel, drafter, identity, pb.DeviceInfo(device_id=f"edge-{index}"))
            for turn in range(2):
                prompt = PROMPTS[(index + turn) % len(PROMPTS)]
                results[index, turn] = client.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
        except BaseException as error:  # reported by the test's thread
            errors.append(error)

    threads = [threading.Thread(target=edge, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for (index, turn), tokens in results.items():
        prompt = PROMPTS[(index + turn) % len(PROMPTS)]
        assert tokens == reference_greedy(target_model, prompt, 24), (index, turn)
    assert len(results) == 8
    after = [sample(server, "wisp_sessions_total") for server in two_servers]
    assert [a - b for a, b in zip(after, before)] == [4, 4]
    assert all(isinstance(c, BalancedChannel) and settled(c) == [0, 0] for c in channels)


def test_a_new_session_goes_to_the_server_where_this_edge_has_fewer_open(two_servers, smollm2_tokenizer):
    """Sessions held open stay where they started; each new one takes the less busy server."""
    channel = connect(EdgeConfig(server=addresses(two_servers)))
    stub = pb_grpc.WispStub(channel)
    held: list[tuple[grpc.Future, threading.Event]] = []
    for prompt in PROMPTS:  # four sessions, open at once
        release = threading.Event()

        def requests(prompt=prompt, release=release):
            yield speculate_open(smollm2_tokenizer, prompt)
            release.wait()

        call = stub.Speculate(requests(), timeout=60)
        assert next(call).opened.session_id
        held.append((call, release))
    assert channel.open_calls() == [2, 2]
    assert [sample(server, "wisp_sessions_active") for server in two_servers] == [2, 2]
    for call, release in held:
        release.set()
        list(call)
    assert settled(channel) == [0, 0]
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=15).engine == "hf"  # unary calls too
    assert channel.open_calls() == [0, 0]


def test_one_target_naming_several_addresses_is_balanced_by_grpc(two_servers):
    """What a DNS name for a headless Kubernetes Service resolves to: gRPC's round_robin spreads the calls."""
    ports = [server.port for server in two_servers]
    stub = pb_grpc.WispStub(connect(EdgeConfig(server="ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports))))
    before = [sample(server, "wisp_sessions_total") for server in two_servers]
    request = pb.GenerateRequest(prompt_token_ids=PROMPTS[0], stop=pb.StopCondition(max_new_tokens=2, ignore_eos=True))
    for _ in range(8):
        assert len([t for r in stub.Generate(request, timeout=30) for t in r.token_ids]) == 2
    after = [sample(server, "wisp_sessions_total") for server in two_servers]
    assert all(a > b for a, b in zip(after, before)), (before, after)
