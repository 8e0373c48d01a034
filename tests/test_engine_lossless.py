"""Losslessness of the hf engine with the edge drafter, in process, on tiny random models.

Many sessions with different prompt lengths, draft lengths and draft quality
are verified together in shared batches and joined at different times; every
output must equal target-only greedy decoding token for token (fp32).
"""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed, reference_greedy, tiny_llama
from scipy.stats import chisquare

from wisp_common.request import SamplingParams
from wisp_edge.drafter import Drafter
from wisp_server.engine import EngineInfo, RoundRequest
from wisp_server.hf_engine import HFVerificationEngine

VOCAB = 512
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def target():
    return tiny_llama(VOCAB, layers=2, seed=0)


def make_engine(model) -> HFVerificationEngine:
    return HFVerificationEngine(model, EngineInfo("tiny", model.config.vocab_size, None, "fp"))


@pytest.mark.parametrize("draft_kind", ["identical", "close", "unrelated"])
def test_batched_speculative_greedy_equals_target_greedy(target, draft_kind):
    draft = {
        "identical": target,
        "close": perturbed(target, 0.05, seed=1),
        "unrelated": tiny_llama(VOCAB, layers=1, seed=7),
    }[draft_kind]
    rng = torch.Generator().manual_seed(42)
    prompts = [
        torch.randint(0, VOCAB, (int(torch.randint(1, 40, (1,), generator=rng)),), generator=rng).tolist()
        for _ in range(20)
    ]
    engine = make_engine(target)
    drafters = [Drafter(draft) for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    drafted = accepted = 0
    step = 0
    while any(len(o) < NEW_TOKENS for o in outputs):
        # Sessions join two at a time, so batches mix first rounds (prefill) with later ones.
        for i in range(min(len(prompts), 2 * step + 2)):
            if i >= 2 * step:
                engine.add_session(str(i), prompts[i], SamplingParams())
                drafters[i].start(prompts[i])
        active = [i for i in range(min(len(prompts), 2 * step + 2)) if len(outputs[i]) < NEW_TOKENS]
        requests = [
            RoundRequest(str(i), tuple(drafters[i].draft(int(torch.randint(0, 7, (1,), generator=rng)))))
            for i in active
        ]
        for i, request, result in zip(active, requests, engine.verify(requests)):
            drafters[i].commit(request.drafts, result.num_accepted, result.next_token)
            outputs[i] += list(request.drafts[: result.num_accepted]) + [result.next_token]
            drafted += len(request.drafts)
            accepted += result.num_accepted
        step += 1
    for prompt, output in zip(prompts, outputs):
        assert output[:NEW_TOKENS] == reference_greedy(target, prompt, NEW_TOKENS)
    rate = accepted / drafted
    expected = {"identical": (1.0, 1.0), "close": (0.1, 0.9), "unrelated": (0.0, 0.1)}[draft_kind]
    assert expected[0] <= rate <= expected[1], rate  # the case really exercises what its name says


def test_removed_sessions_free_their_state_and_others_continue(target):
    engine = make_engine(target)
    engine.add_session("a", [1, 2, 3], SamplingParams())
    engine.add_session("b", [4, 5], SamplingParams())
    engine.verify([RoundRequest("a", ()), RoundRequest("b", ())])
    engine.remove_session("a")
    assert "a" not in engine._sessions
    out = [engine.verify([RoundRequest("b", ())])[0].next_token for _ in range(5)]
    first = reference_greedy(target, [4, 5], 6)
    assert out == first[1:]


@torch.inference_mode()
def test_sampled_tokens_follow_the_target_distribution():
    """Marginals of the first two committed tokens match the target's, drafts partly right."""
    vocab, sessions = 16, 3000
    target = tiny_llama(vocab, layers=1, seed=3)
    prompt = [1, 2, 3]
    p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1], -1)
    p2 = sum(p1[t] * torch.softmax(target(torch.tensor([prompt + [t]])).logits[0, -1], -1) for t in range(vocab))
    likely = reference_greedy(target, prompt, 3)

    engine = make_engine(target)
    rng = torch.Generator().manual_seed(9)
    requests = []
    for s in range(sessions):
        engine.add_session(str(s), prompt, SamplingParams(temperature=1.0, seed=s + 1))
        drafts = [
            t if float(torch.rand(1, generator=rng)) < 0.7 else int(torch.randint(0, vocab, (1,), generator=rng))
            for t in likely
        ]
        requests.append(RoundRequest(str(s), tuple(drafts)))
    tokens = [list(r.drafts[: v.num_accepted]) + [v.next_token] for r, v in zip(requests, engine.verify(requests))]
    short = [s for s in range(sessions) if len(tokens[s]) < 2]
    for s, v in zip(short, engine.verify([RoundRequest(str(s), ()) for s in short])):
        tokens[s].append(v.next_token)
    assert 0 < len(short) < sessions  # both the accept and the reject paths ran

    for position, p in ((0, p1), (1, p2)):
        counts = torch.bincount(torch.tensor([t[position] for t in tokens]), minlength=vocab).float()
        assert chisquare(counts.numpy(), (p * sessions).numpy()).pvalue > 1e-3, position
