"""The edge's `SpeculationController`, and losslessness under every scheduling policy and controller setting."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_client
from helpers import assert_greedy_equal, reference_greedy, running_server, save_with_tokenizer, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from wisp_common.models import load_causal_lm
from wisp_common.request import SamplingParams, Slo
from wisp_edge.client import server_pacing_pays
from wisp_edge.controller import AcceptancePredictor, AdaptiveSpeculation, FixedLength, RoundTiming, verdict_labels
from wisp_edge.drafter import DraftSignals, ModelDrafter
from wisp_edge.lookup import PromptLookup
from wisp_edge.suffix import SuffixDecoding


def signals(top1: float) -> DraftSignals:
    """A draft distribution with mass ``top1`` on its best token and the rest spread over 99 others."""
    rest = (1 - top1) / 99
    entropy = -top1 * math.log(top1) - 99 * rest * math.log(rest) if rest > 0 else 0.0
    return DraftSignals(top1, entropy, top1 - rest)


confidences = st.lists(st.floats(0.01, 0.99), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(confidences, st.integers(1, 8))
def test_the_controller_sends_exactly_the_drafts_whose_run_stays_likely(tops, max_drafts):
    controller = AdaptiveSpeculation(max_drafts, AcceptancePredictor(), min_run_probability=0.25)
    drafted = [signals(t) for t in tops]
    length = controller.round_length(drafted, RoundTiming(), can_draft_more=False)
    assert 0 <= length <= min(len(tops), max_drafts)
    runs = np.cumprod([controller.predictor.probability(s, i) for i, s in enumerate(drafted)])
    assert length >= 1  # the first draft always goes: its verdict keeps the predictor learning
    assert all(runs[1:length] >= 0.25)
    if length < min(len(tops), max_drafts):
        assert runs[length] < 0.25  # it stopped at the first draft that made the run unlikely


def test_the_controller_stops_early_on_low_confidence_and_runs_long_on_high():
    controller = AdaptiveSpeculation(8, AcceptancePredictor())
    assert controller.round_length([signals(0.98)] * 12, RoundTiming(), can_draft_more=False) >= 6
    assert controller.round_length([signals(0.05)] * 12, RoundTiming(), can_draft_more=False) == 1


def test_the_controller_asks_for_more_drafts_only_while_they_look_good():
    controller = AdaptiveSpeculation(6, AcceptancePredictor())
    assert controller.round_length([signals(0.97)] * 2, RoundTiming(), can_draft_more=True) is None
    assert controller.round_length([signals(0.97), signals(0.05)], RoundTiming(), can_draft_more=True) == 1
    assert controller.round_length([signals(0.05), signals(0.05)], RoundTiming(), can_draft_more=True) == 1
    fixed = FixedLength(3)  # SLED: always the fixed length, whatever the confidence
    assert fixed.round_length([signals(0.05)] * 2, RoundTiming(), can_draft_more=True) is None
    assert fixed.round_length([signals(0.05)] * 5, RoundTiming(), can_draft_more=True) == 3


def test_pipelined_drafting_goes_on_only_while_the_run_out_for_verification_stays_likely():
    controller = AdaptiveSpeculation(4, AcceptancePredictor(), min_run_probability=0.25)
    assert controller.keeps_pipelining([signals(0.97)] * 3)  # likely all accepted: the next round's work may stand
    assert not controller.keeps_pipelining([signals(0.97), signals(0.05)])  # the verdict will almost surely reject
    assert not controller.keeps_pipelining([signals(0.6)] * 4)  # each likely, the run of four not (0.6**4 < 0.25)
    assert FixedLength(4).keeps_pipelining([signals(0.05)] * 4)  # SLED pipelines regardless


def test_one_more_draft_only_where_it_pays_for_its_time():
    controller = AdaptiveSpeculation(8, AcceptancePredictor(), min_run_probability=0.0)
    confident = [signals(0.99)] * 3
    fast_drafter = RoundTiming(rtt=0.01, queue=0.0, verify=0.02, draft_token=0.005)
    slow_drafter = RoundTiming(rtt=0.01, queue=0.0, verify=0.02, draft_token=0.15)
    assert controller.round_length(confident, fast_drafter, can_draft_more=True) is None  # one more, please
    assert controller.round_length(confident, slow_drafter, can_draft_more=True) == 3  # send what it has
    # A costly round (a long queue) makes each draft's time a small share of it: drafting goes on.
    congested = RoundTiming(rtt=0.01, queue=1.0, verify=0.02, draft_token=0.15)
    assert controller.round_length(confident, congested, can_draft_more=True) is None
    # Drafts made while the last round was out cost no more time: the slow drafter sends them all.
    assert controller.round_length([signals(0.99)] * 8, slow_drafter, can_draft_more=False) == 8
    # The rule is the rate's: drafting token n+1 pays exactly when it raises the round's tokens per second.
    run = np.cumprod([controller.predictor.probability(s, i) for i, s in enumerate(confident)])
    gain = run[-1] * controller.predictor.probability(confident[-1], 3)
    fixed = 0.01 + 0.02
    for draft_token in (0.001, 0.01, 0.05, 0.1, 0.3):
        timing = RoundTiming(rtt=0.01, verify=0.02, draft_token=draft_token)
        now = (1 + run.sum()) / (fixed + 3 * draft_token)
        after = (1 + run.sum() + gain) / (fixed + 4 * draft_token)
        assert (controller.round_length(confident, timing, can_draft_more=True) is None) == (after > now)


def test_a_draft_that_would_be_held_back_is_not_drafted():
    """Drafting a token only to withhold it costs the round its whole drafting time: the next token is judged,
    before it is drafted, as likely as the last one."""
    controller = AdaptiveSpeculation(8, AcceptancePredictor(), min_run_probability=0.25)
    wavering = [signals(0.97), signals(0.4)]  # both go (their run stays over 0.25), a third at 0.4 would not
    assert controller.round_length(wavering, RoundTiming(), can_draft_more=True) == 2
    assert controller.round_length([signals(0.97)] * 2, RoundTiming(), can_draft_more=True) is None


def test_verdicts_label_drafts_up_to_the_first_rejection():
    s = [signals(0.5)] * 5
    assert [(p, a) for _, p, a in verdict_labels(s, 5, 2)] == [(0, True), (1, True), (2, False)]
    assert [(p, a) for _, p, a in verdict_labels(s, 3, 3)] == [(0, True), (1, True), (2, True)]
    assert verdict_labels(s, 0, 0) == []


def synthetic_rows(weights: np.ndarray, n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s, position = replace(signals(rng.uniform(0.02, 0.98)), lookup=rng.random() < 0.3), rng.randrange(8)
        p = AcceptancePredictor(weights).probability(s, position)
        rows.append((s, position, rng.random() < p))
    return rows


def test_the_fitted_predictor_beats_the_prior_and_adapts_online(tmp_path):
    truth = np.array([-1.0, 3.0, -0.3, 1.0, -1.5, 2.5, 0.0])  # deeper positions less often, lookup tokens more
    rows = synthetic_rows(truth, 4000, seed=1)
    fitted = AcceptancePredictor.fit(rows)
    held_out = synthetic_rows(truth, 2000, seed=2)
    assert fitted.log_loss(held_out) < AcceptancePredictor().log_loss(held_out) - 0.02
    fitted.save(tmp_path / "controller.json")
    assert np.allclose(AcceptancePredictor.beside(str(tmp_path)).weights, fitted.weights)
    assert fitted.weights[5] > 1.5  # it learns that lookup tokens are accepted more often
    # A predictor saved before the lookup and suffix features existed loads with weight 0 on them: as it was fitted.
    (tmp_path / "old.json").write_text(json.dumps({"weights": [-1.0, 3.0, -0.3, 1.0, -1.5]}))
    assert AcceptancePredictor.load(tmp_path / "old.json").weights.tolist() == [-1.0, 3.0, -0.3, 1.0, -1.5, 0.0, 0.0]

    online = AdaptiveSpeculation(4, AcceptancePredictor())
    before = online.predictor.log_loss(held_out)
    for s, position, accepted in rows[:3000]:
        online.predictor.update(s, position, accepted)
    assert online.predictor.log_loss(held_out) < before


@pytest.fixture(scope="module")
def target_model(tiny_pair):
    return load_causal_lm(tiny_pair[0])


@pytest.fixture(scope="module")
def unrelated_draft(tmp_path_factory, smollm2_tokenizer):
    return save_with_tokenizer(tiny_llama(49152, layers=1, seed=7), smollm2_tokenizer, tmp_path_factory.mktemp("u"))


PROMPTS = [[1, 504, 3458, 282, 4649, 314, 5465, 47], [1, 9690, 198, 2683, 314, 260, 3575, 30], [1, 2, 3, 4, 5]]
CONTROLLER_SETTINGS = [  # adaptive, pipelined, SLO
    (True, True, Slo(1.0, 0.001)),
    (True, False, Slo(2.0, 0.5)),
    (False, True, Slo()),
    (False, False, Slo()),
]


def generate_at_once(address: str, drafts: list[str], tokenizer, adaptive: bool, pipeline: bool, slo: Slo) -> list:
    """Every prompt in its own session with its own draft model, all at the same time; results in prompt order."""
    results: list = [None] * len(PROMPTS)

    def run(i: int) -> None:
        client = make_client(address, drafts[i], tokenizer)
        client.speculation = AdaptiveSpeculation.mode_with(AcceptancePredictor()) if adaptive else FixedLength
        client.pipeline, client.server_decoding = pipeline, adaptive  # WISP's edges let the server decode
        if i == len(PROMPTS) - 1:  # the unrelated draft's session takes every token the prompt lookup proposes
            client.drafter.lookup = PromptLookup(max_ngram=4, below=1.01)
        if i == 1:  # the close draft's session drafts with the suffix index too
            client.drafter.suffix = SuffixDecoding(min_probability=0.0).decoder()
        results[i] = client.generate(PROMPTS[i], max_new_tokens=40, draft_tokens=5, ignore_eos=True, slo=slo)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("policy", ["wisp", "sled", "fcfs"])
def test_every_policy_and_controller_setting_is_lossless(
    policy, tiny_pair, smollm2_tokenizer, target_model, unrelated_draft
):
    """Adaptive and fixed rounds, with and without pipelining, with tight and loose SLOs, three sessions at once.

    The first session drafts with the target itself, so its drafts are always accepted and pipelined drafts
    survive; the others draft with a close and an unrelated model (with the prompt lookup), so drafts are
    rejected too.
    """
    with running_server(tiny_pair[0], engine="hf", policy=policy, max_sessions=8, sled_window=0.01) as server:
        for adaptive, pipeline, slo in CONTROLLER_SETTINGS:
            address = f"127.0.0.1:{server.port}"
            drafts = [tiny_pair[0], tiny_pair[1], unrelated_draft]
            results = generate_at_once(address, drafts, smollm2_tokenizer, adaptive, pipeline, slo)
            for prompt, result in zip(PROMPTS, results):
                assert result.token_ids == reference_greedy(target_model, prompt, 40), (adaptive, pipeline)
            stats = [r.stats for r in results]
            assert all(s.wasted == s.drafted - s.accepted >= 0 for s in stats)
            if slo.tpot_seconds == 0 or slo.tpot_seconds > 0.1:  # (a 1 ms TPOT leaves no time to draft)
                assert stats[0].accepted > 0 and stats[2].accepted < stats[2].sent
            if pipeline:
                assert stats[0].pipelined_kept > 0  # the bonus token was guessed


def test_where_no_draft_pays_the_server_decodes_the_session_itself_losslessly(
    tiny_pair, target_model, smollm2_tokenizer
):
    """A server that verifies no drafts suggests none: an edge that accepts server decoding gets every token after
    the first verdict without a round trip, the target's own; one that does not keeps sending empty rounds."""
    with running_server(tiny_pair[0], engine="hf", max_draft_tokens=0) as server:
        for accepts in (True, False):
            client = make_client(f"127.0.0.1:{server.port}", tiny_pair[1], smollm2_tokenizer)
            client.speculation, client.server_decoding = AdaptiveSpeculation.mode_with(AcceptancePredictor()), accepts
            result = client.generate(PROMPTS[0], max_new_tokens=24, draft_tokens=4, ignore_eos=True)
            assert result.token_ids == reference_greedy(target_model, PROMPTS[0], 24)
            stats = result.stats
            assert stats.sent == 0
            if accepts:
                assert (stats.server_decoded, stats.rounds) == (23, 1)
            else:
                assert (stats.server_decoded, stats.rounds) == (0, 24)


@pytest.mark.gpu
def test_a_server_on_cuda_is_lossless_for_edges_over_loopback(
    tiny_pair, smollm2_tokenizer, target_model, unrelated_draft
):
    """The GPU path: the hf engine on CUDA behind a real gRPC server, edges on the CPU, adaptive and fixed."""
    with running_server(tiny_pair[0], engine="hf", device="cuda", max_sessions=8) as server:
        for adaptive, pipeline, slo in CONTROLLER_SETTINGS[1:3]:
            drafts = [tiny_pair[0], tiny_pair[1], unrelated_draft]
            results = generate_at_once(f"127.0.0.1:{server.port}", drafts, smollm2_tokenizer, adaptive, pipeline, slo)
            for prompt, result in zip(PROMPTS, results):
                assert_greedy_equal(target_model, prompt, result.token_ids, reference_greedy(target_model, prompt, 40))
            assert results[0].stats.accepted > 0


@pytest.mark.parametrize(("keep", "left"), [(0, 0), (3, 3), (5, 5), (9, 5)])
def test_crop_cache_keeps_the_first_positions(keep, left):
    """Down to zero too, which the deprecated form of `DynamicCache.crop` could not do."""
    from transformers import DynamicCache

    from wisp_edge.drafter import crop_cache

    cache = DynamicCache()
    cache.update(torch.arange(10.0).view(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)
    crop_cache(cache, keep)
    assert cache.get_seq_length() == left
    assert torch.equal(cache.layers[0].keys, torch.arange(10.0).view(1, 1, 5, 2)[:, :, :left])


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([1, 2, 3, 9, 1, 2, 3], 9),  # the suffix 1 2 3 occurred before, followed by 9
        ([1, 2, 5, 1, 2, 6, 1, 2], 6),  # the latest earlier occurrence wins
        ([7, 2, 3, 8, 5, 2, 3, 9, 7, 2, 3], 8),  # the longest matching suffix wins over a later, shorter one
        ([4, 5, 6, 4], None),  # a single token's match is below min_ngram
        ([3, 3, 3], 3),  # overlapping copies count
        ([1], None),
    ],
)
def test_prompt_lookup_proposes_what_followed_the_longest_earlier_copy_of_the_suffix(tokens, expected):
    assert PromptLookup(max_ngram=4, below=1.0).propose(tokens) == expected


def test_the_drafter_takes_the_lookup_only_where_the_draft_is_unsure():
    model = tiny_llama(500, layers=1, seed=3)
    context = [10, 11, 12, 13, 14, 10, 11]  # the lookup proposes 12
    picks = {}
    for below in (0.0, 1.01):
        drafter = ModelDrafter(model, lookup=PromptLookup(max_ngram=4, below=below))
        drafter.start(context)
        picks[below] = drafter.draft_one(), drafter.signals[0].lookup
    plain = ModelDrafter(model)
    plain.start(context)
    assert picks[0.0] == (plain.draft_one(), False) and plain.pending[0] != 12
    assert picks[1.01] == (12, True)


def test_a_branch_starts_from_the_first_drafts_runner_up_and_leaves_the_drafter_as_it_was():
    """`Drafter.branch`: the draft's second choice at the first pending position, then what a drafter with that
    token committed drafts; the main chain's next drafts are unchanged. Sampled sessions have none."""
    model = tiny_llama(500, layers=1, seed=3)
    context = [10, 11, 12, 13, 14]
    drafter = ModelDrafter(model)
    drafter.start(context)
    drafter.draft(2)
    with torch.inference_mode():
        runner_up = int(model(input_ids=torch.tensor([context])).logits[0, -1].topk(2).indices[1])
    tokens, signals = drafter.branch(3)
    assert drafter.signals[0].runner_up == runner_up != drafter.pending[0]
    other = ModelDrafter(model)
    other.start([*context, runner_up])
    assert tokens == [runner_up, *other.draft(2)] and len(signals) == 3
    unbranched = ModelDrafter(model)
    unbranched.start(context)
    assert drafter.pending == unbranched.draft(2) and drafter.draft(2) == unbranched.draft(2)
    sampled = ModelDrafter(model, SamplingParams(temperature=0.8, seed=1))
    sampled.start(context)
    sampled.draft(2)
    assert sampled.branch(3) is None


def test_a_server_paced_edge_streams_second_guesses_and_stays_lossless(
    tiny_pair, tiny_server, smollm2_tokenizer, target_model, monkeypatch
):
    """Server-paced with branches (the default): each first guess carries a second one in the same message, a
    step verifies whichever fits, and the text is the target's. The tiny target's steps are slowed to a GPU's
    (an injected 30 ms) so that the streamed drafts reach the server in time to be verified."""
    server, address = tiny_server
    verify = server.service.engine.verify
    monkeypatch.setattr(server.service.engine, "verify", lambda batch: (time.sleep(0.03), verify(batch))[1])
    client = make_client(address, tiny_pair[1], smollm2_tokenizer, pacing="server")
    result = client.generate(PROMPTS[0], max_new_tokens=24, draft_tokens=4, ignore_eos=True)
    assert result.token_ids == reference_greedy(target_model, PROMPTS[0], 24)
    stats = result.stats
    assert stats.server_paced and stats.rounds > 0 and stats.branches > 0
    assert 0 <= stats.branches_verified <= min(stats.branches, stats.rounds)


def test_a_drafter_whose_step_failed_midway_forgets_its_state_and_drafts_as_a_new_one(
    tiny_pair, tiny_server, smollm2_tokenizer, monkeypatch
):
    """A drafting step that raised between two layers (out of memory, say) left the first layer's KV longer than
    the second's. The client makes its drafter forget everything then (it keeps its state between requests for a
    conversation's next turn); the next request drafts what a fresh drafter drafts."""
    client = make_client(tiny_server[1], tiny_pair[1], smollm2_tokenizer)
    drafter, model = client.drafter, client.drafter.model
    context = smollm2_tokenizer.encode("The tiny model rambles on")
    fresh = ModelDrafter(model)
    fresh.start(context)
    expected = fresh.draft(4)
    with monkeypatch.context() as patch:
        patch.setattr(model.model.layers[1], "forward", lambda *args, **kwargs: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            client.generate(context, max_new_tokens=8)
    assert all(layer.get_seq_length() == 0 for layer in drafter._cache.layers)
    assert drafter.tokens == [] and drafter.known_features == 0
    drafter.start(context)
    assert drafter.draft(4) == expected


@pytest.mark.parametrize(
    ("step", "rtt", "draft", "paced"),
    [
        (0.040, 0.009, 0.0062, True),  # this CPU's target, a laptop on Wi-Fi: 27.6 ms of trip and drafts a step
        (0.027, 0.0005, 0.00447, True),  # a Qwen3-32B step on an H200, a Jetson on the LAN
        (0.004, 0.0002, 0.002, False),  # a tiny target: it steps before three drafts are ready
        (0.040, 0.030, 0.004, False),  # a long round trip
    ],
)
def test_auto_pacing_asks_the_server_to_pace_only_where_a_step_leaves_time_to_get_drafts_in(step, rtt, draft, paced):
    assert server_pacing_pays(RoundTiming(rtt=rtt, verify=step, draft_token=draft)) is paced


def test_the_edge_measures_the_trip_apart_from_the_servers_handling(
    tiny_server, tiny_pair, smollm2_tokenizer, target_model, monkeypatch
):
    """A server slow to answer after verifying (here each verdict's hints take 60 ms more, an injected stall) is
    not a long network trip: the verdict says how long the round spent at the server, and the edge's measured
    round trip is only the rest (loopback: a few ms), so auto pacing is not misled by a loaded server's host."""
    server, address = tiny_server
    hints = server.service._hints

    def slow_hints(*args):
        time.sleep(0.06)
        return hints(*args)

    monkeypatch.setattr(server.service, "_hints", slow_hints)
    client = make_client(address, tiny_pair[1], smollm2_tokenizer, pacing="edge")
    result = client.generate(PROMPTS[0], max_new_tokens=12, draft_tokens=4, ignore_eos=True)
    assert result.token_ids == reference_greedy(target_model, PROMPTS[0], 12)
    assert result.stats.round_trip_seconds / result.stats.rounds >= 0.06  # the wall time did include the stall
    assert 0 < client.measured.rtt < 0.03


def test_auto_pacing_measures_the_server_in_an_edge_paced_session_then_picks_per_session(
    tiny_server, tiny_pair, smollm2_tokenizer, target_model
):
    """The first session is edge-paced and measures the server's step, the round trip and the drafting; each next
    one is paced as `server_pacing_pays` says on what the last measured. Either way the text is the target's."""
    client = make_client(tiny_server[1], tiny_pair[1], smollm2_tokenizer, pacing="auto")
    expected = reference_greedy(target_model, PROMPTS[0], 24)

    def generate():
        result = client.generate(PROMPTS[0], max_new_tokens=24, draft_tokens=4, ignore_eos=True)
        assert result.token_ids == expected
        return result.stats

    assert client.measured is None and not generate().server_paced
    measured = client.measured
    assert measured.verify > 0 and measured.rtt > 0 and measured.draft_token > 0
    assert generate().server_paced is server_pacing_pays(measured)
    client.measured = RoundTiming(rtt=0.001, verify=1.0, draft_token=0.001)  # a slow server, a fast edge
    stats = generate()
    assert stats.server_paced and client.measured.rtt == 0.001  # a server-paced session does not measure the trip
    client.measured = RoundTiming(rtt=0.01, verify=0.001, draft_token=0.01)  # a fast server, a slow edge
    assert not generate().server_paced
    with pytest.raises(ValueError, match="pacing must be one of auto, edge, server"):
        make_client(tiny_server[1], tiny_pair[1], smollm2_tokenizer, pacing="fast")
