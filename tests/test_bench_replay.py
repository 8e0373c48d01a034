"""Replayed devices: recorded chains, replayed at the device's pace, over an emulated link; and their validation
against real edge processes."""

from __future__ import annotations

import time

import grpc
import pytest
from helpers import running_server

from wisp_bench.channel import emulated_channel
from wisp_bench.replay import Recording, ReplayDrafter, load_recordings, save_recordings, synthetic_recordings
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


@pytest.mark.parametrize("accuracy", [0.0, 0.1, 0.3, 0.8, 1.0])
def test_a_synthetic_draft_is_right_at_its_accuracy_and_replays_like_a_recorded_one(accuracy):
    """`wisp-bench run --draft-accuracy`: each position's draft is the target's token at about that share of
    positions, the same from every context (chains agree with each other along the answer), wrong ones are never
    the target's, signals say the accuracy with its pick the likeliest, a seed gives the same draft again, and
    its chains grow as a recorded drafter's: ``depth`` more after the drafts the answer kept."""
    answer = [(7 * i) % 50 for i in range(3000)]
    recording = Recording([1, 2, 3], answer, [[] if i == 0 else chain(0) for i in range(2990)])
    (synthetic,) = synthetic_recordings([recording], accuracy, seed=5, depth=4)
    assert (synthetic.prompt, synthetic.answer) == (recording.prompt, recording.answer)
    drafted = {i + j: token for i, c in enumerate(synthetic.chains) for j, (token, _) in enumerate(c)}
    right = {position: token == answer[position] for position, token in drafted.items()}
    assert sum(right.values()) / len(right) == pytest.approx(accuracy, abs=0.03)
    for i, c in enumerate(synthetic.chains):
        assert [token for token, _ in c] == [drafted[i + j] for j in range(len(c))]  # alike from every context
        assert all(s.top1 == accuracy and s.margin >= 0 and s.runner_up is None for _, s in c)
        kept = len(synthetic.chains[i - 1]) - 1 if i > 1 and right[i - 1] else 0
        assert len(c) == (0 if i == 0 else min(kept + 4, 3000 - i))
    if accuracy in (0.0, 1.0):  # a wrong draft is never the target's token, a right one always is
        assert set(right.values()) == {bool(accuracy)}
    assert all(0 <= t < 50 for t in drafted.values())  # ids the answer's vocabulary has
    assert synthetic_recordings([recording], accuracy, seed=5, depth=4) == [synthetic]
    if 0 < accuracy < 1:
        assert synthetic_recordings([recording], accuracy, seed=6, depth=4) != [synthetic]
    drafter = ReplayDrafter([synthetic], seconds_per_token=0.0)
    drafter.start([1, 2, 3])
    drafter.commit(0, answer[0])
    assert drafter.draft(4) == [drafted[j] for j in range(1, 5)]


def test_a_what_if_draft_needs_replayed_devices_and_says_so_in_every_result(tmp_path, capsys):
    from wisp_bench.cli import main, main_parser, regime_label

    args = ["run", "--devices", "real", "--draft-accuracy", "0.7", "--output-dir", str(tmp_path)]
    assert main(args) == 2
    assert "--draft-accuracy replaces replayed drafts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--draft-accuracy", "1.5"])
    assert "1.5 is not between 0 and 1" in capsys.readouterr().err
    what_if = main_parser().parse_args(["run", "--regime", "modeled", "--draft-accuracy", "0.9"])
    assert "what-if: a synthetic draft right at 90% of positions" in regime_label(what_if)
    assert "what-if" not in regime_label(main_parser().parse_args(["run", "--regime", "modeled"]))


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
