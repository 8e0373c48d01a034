"""Replayed devices: recorded chains, replayed at the device's pace, over an emulated link; and their validation
against real edge processes."""

from __future__ import annotations

import time

import grpc
import pytest
from helpers import running_server

from wisp_bench.channel import emulated_channel
from wisp_bench.replay import Recording, ReplayDrafter, load_recordings, save_recordings
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_edge.drafter import DraftSignals


def chain(*tokens: int) -> list[tuple[int, DraftSignals]]:
    return [(t, DraftSignals(0.9, 0.1, 0.8, lookup=t % 2 == 0)) for t in tokens]


RECORDING = Recording([1, 2, 3], [10, 11, 12, 13, 14], [[], chain(11, 12, 99), chain(12, 13, 14), chain(13, 14, 15)])


def test_the_drafter_plays_the_chain_of_the_point_its_session_has_reached():
    drafter = ReplayDrafter([RECORDING], seconds_per_token=0.0)
    drafter.start([1, 2, 3])
    assert drafter.draft(3) == []  # before the first verdict, no features: nothing to draft, as the real draft
    drafter.commit(0, 10)
    assert drafter.draft(4) == [11, 12, 99] and drafter.signals == [s for _, s in chain(11, 12, 99)]
    drafter.commit(1, 12)  # the first draft accepted, the second was the target's own token: kept (pipelined)
    assert drafter.tokens == [1, 2, 3, 10, 11, 12] and drafter.pending == [99]
    assert drafter.draft(3) == [14, 15]  # the new point's chain past the kept draft (the one approximation)
    with pytest.raises(KeyError, match="record the workload"):
        drafter.start([7, 7])


def test_a_branch_is_the_recorded_runner_up_then_the_chain_one_point_on():
    """Where the runner-up is the target's token (here 11 at the first point), the chain recorded after it is what
    a real branch drafts after it; the main chain is untouched."""
    recording = Recording(
        RECORDING.prompt,
        RECORDING.answer,
        [[], [(7, DraftSignals(0.6, 1.0, 0.2, runner_up=11))], *RECORDING.chains[2:]],
    )
    drafter = ReplayDrafter([recording], seconds_per_token=0.0)
    drafter.start([1, 2, 3])
    drafter.commit(0, 10)
    assert drafter.draft(2) == [7]
    tokens, signals = drafter.branch(3)
    assert (
        tokens == [11, 12, 13]
        and signals[0].top1 == pytest.approx(0.4)
        and signals[1:] == [s for _, s in chain(12, 13)]
    )
    assert drafter.pending == [7] and drafter.branch(1) == ([11], signals[:1])
    drafter.commit(0, 11)
    assert drafter.draft(3) == [12, 13, 14]


def test_drafting_takes_the_devices_time_per_token():
    drafter = ReplayDrafter([RECORDING], seconds_per_token=0.02)
    drafter.start([1, 2, 3])
    drafter.commit(0, 10)
    started = time.monotonic()
    drafter.draft(3)
    assert 0.06 <= time.monotonic() - started < 0.2


def test_recordings_survive_the_round_trip_through_their_file(tmp_path):
    save_recordings(tmp_path / "r.json", [RECORDING], {"seed": 0})
    assert load_recordings(tmp_path / "r.json") == [RECORDING]


def test_the_emulated_link_delays_every_message_each_way(tiny_pair):
    """A Generate stream through a link of 50 ms each way: the first token pays a round trip, later ones do not
    pay it again (they stream), and the tokens are the server's."""
    with running_server(tiny_pair[0], engine="hf") as server:
        address = f"127.0.0.1:{server.port}"
        request = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], stop=pb.StopCondition(max_new_tokens=8))

        def timed(channel) -> tuple[float, float, list[int]]:
            started, times, tokens = time.monotonic(), [], []
            for response in pb_grpc.WispStub(channel).Generate(request):
                times.append(time.monotonic() - started)
                tokens += response.token_ids
            return times[0], times[-1] - times[0], tokens

        timed(grpc.insecure_channel(address))  # warm
        direct_first, direct_stream, direct_tokens = timed(grpc.insecure_channel(address))
        link_first, link_stream, link_tokens = timed(emulated_channel(address, lambda n: 0.05, lambda n: 0.05))
    assert link_tokens == direct_tokens
    assert link_first >= 0.1  # the request and the first response each waited 50 ms: never sooner
    assert link_first - direct_first < 0.25  # (the difference alone is two noisy timings: not a lower bound)
    assert link_stream < direct_stream + 0.1
