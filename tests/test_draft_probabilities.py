"""Draft probabilities for sampled sessions: the edge samples each draft from the sparse q it sends, and the
server refuses a q that breaks the protocol, over a real gRPC server.

The rule itself (accept with min(1, p/q), else the residual) is checked exactly in test_verification.py and
through both engines in test_engine_lossless.py.
"""

from __future__ import annotations

import random
import threading

import grpc
import pytest
import torch
from conftest import SMOLLM2_VOCAB, make_client
from helpers import running_server, save_with_tokenizer, tiny_llama
from scipy.stats import chisquare

from wisp_common.models import tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import SamplingParams
from wisp_common.verification import target_distribution
from wisp_edge.drafter import PROPOSAL_TOKENS, ModelDrafter
from wisp_edge.lookup import PromptLookup

PROMPT = [1, 504, 3458, 282, 4649, 314, 5465, 47]
SAMPLED = SamplingParams(temperature=0.8, seed=5)
DRAWS = 2000


@pytest.mark.slow
@torch.inference_mode()
def test_the_drafter_samples_each_draft_from_the_q_it_sends():
    """Lossless only if the draft really follows the q the server is told: its draws against that q."""
    model = tiny_llama(64, layers=1, seed=4, hidden=64, heads=2)
    drafter = ModelDrafter(model, SAMPLED)
    counts: dict[int, int] = {}
    proposal = None
    for _ in range(DRAWS):
        drafter.start([3, 9, 27])
        token = drafter.draft_one()
        # The same q every time, up to rounding (the drafter may reuse its KV of the context it saw last).
        same = proposal is None or (
            drafter.proposals[0].token_ids == proposal.token_ids
            and drafter.proposals[0].probs == pytest.approx(proposal.probs, abs=1e-6)
        )
        assert drafter.proposals[0] is not None and same
        proposal = drafter.proposals[0]
        counts[token] = counts.get(token, 0) + 1
    assert proposal is not None and len(proposal.token_ids) == PROPOSAL_TOKENS
    assert set(counts) <= set(proposal.token_ids)  # nothing outside the support
    assert sum(proposal.probs) == pytest.approx(1.0, abs=1e-5)
    observed = [counts.get(t, 0) for t in proposal.token_ids]
    expected = [p / sum(proposal.probs) * DRAWS for p in proposal.probs]
    assert chisquare(observed, expected).pvalue > 1e-3


@torch.inference_mode()
def test_copied_greedy_and_switched_off_drafts_carry_no_q():
    model = tiny_llama(64, layers=1, seed=4, hidden=64, heads=2)
    copying = ModelDrafter(model, SAMPLED, lookup=PromptLookup(max_ngram=2, below=1.1))  # always copies
    copying.start([5, 6, 7, 5, 6])
    assert copying.draft_one() == 7 and copying.proposals == [None]
    for drafter in (ModelDrafter(model), ModelDrafter(model, SAMPLED, draft_probabilities=False)):
        drafter.start([3, 9, 27])
        drafter.draft(3)
        assert drafter.proposals == [None, None, None]
    sampled = ModelDrafter(model, SAMPLED)
    sampled.start([3, 9, 27])
    drafts = sampled.draft(3)
    sampled.commit(1, drafts[1])  # the second draft was the server's own token: the third survives with its q
    assert sampled.pending == drafts[2:] and len(sampled.proposals) == 1 and sampled.proposals[0] is not None


@pytest.fixture(scope="module")
def stub(tiny_server):
    return pb_grpc.WispStub(grpc.insecure_channel(tiny_server[1]))


def sampled_open(tokenizer) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(
        open=pb.OpenSession(
            draft_model=pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)),
            prompt_token_ids=PROMPT,
            sampling=SAMPLED.to_proto(),
            stop=pb.StopCondition(max_new_tokens=16, ignore_eos=True),
        )
    )


def draft_with_q(drafts: list[int], *entries: tuple[list[int], list[float]]) -> pb.SpeculateRequest:
    q = [pb.DraftProbabilities(token_ids=ids, probs=probs) for ids, probs in entries]
    return pb.SpeculateRequest(draft=pb.DraftRound(position=len(PROMPT), token_ids=drafts, draft_probabilities=q))


@pytest.mark.parametrize(
    ("drafts", "entries", "words"),
    [
        ([5, 6], [([5], [1.0])], "1 entries for 2 drafts"),
        ([5], [([5, 6], [float("inf"), 0.5])], "finite number in [0, 1]"),
        ([5], [([5, 6], [0.9, 0.9])], "sums to 1.8"),
        ([7], [([5, 6], [0.5, 0.5])], "gives the draft 7 no probability"),
        ([5], [([5, SMOLLM2_VOCAB], [0.5, 0.5])], "outside the vocabulary"),
    ],
)
def test_bad_draft_probabilities_are_invalid_argument(stub, smollm2_tokenizer, drafts, entries, words):
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Speculate(iter([sampled_open(smollm2_tokenizer), draft_with_q(drafts, *entries)]), timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in refused.value.details()


def test_a_round_with_q_and_a_point_mass_is_verified(stub, smollm2_tokenizer):
    """An entry per draft, empty for a copied one (a point mass): the round is verified, not refused."""
    responses = list(
        stub.Speculate(iter([sampled_open(smollm2_tokenizer), draft_with_q([5, 6], ([5, 9], [0.5, 0.5]), ([], []))]))
    )
    verdict = responses[1].verdict
    assert verdict.position == len(PROMPT) + verdict.num_accepted + 1


def test_an_edge_sending_q_generates_through_a_real_server(tiny_server, tiny_pair, smollm2_tokenizer):
    """Every round the edge sends passes the server's checks, pipelined drafts included."""
    client = make_client(tiny_server[1], tiny_pair[1], smollm2_tokenizer)
    client.drafter.sampling = SAMPLED
    result = client.generate(PROMPT, max_new_tokens=40, sampling=SAMPLED, ignore_eos=True)
    assert len(result.token_ids) == 40 and result.stats.sent > 0


@pytest.mark.slow  # 1500 sessions: about half a minute here
def test_server_paced_steps_verify_a_later_draft_by_its_own_q(tmp_path, smollm2_tokenizer):
    """A server-paced step verifies the drafts of a streamed round from where the committed text has reached,
    each by the q it was sampled from: here the second draft, by its own q, once the first token came.

    Each seeded session streams its round with its opening: a draft d1 for the first token and a draft d2
    sampled from a two-token q for the second. The first step verifies nothing (no hint yet); where it commits
    d1, the second verifies d2 by min(1, p/q) with the residual. The first token must follow the target's
    distribution, and the second, given d1, the target's distribution after d1. d1 comes with a q it was not
    sampled from, far from d2's: a step that read it for d2 (the round's first q, not the one at d2's place)
    would not keep the target's distribution, and one that verified d1 would not either."""
    vocab, sessions = 16, 1500
    target = tiny_llama(vocab, layers=1, seed=3, hidden=64, heads=2)
    path = save_with_tokenizer(target, smollm2_tokenizer, tmp_path / "target")
    prompt, sampling = [1, 2, 3], SamplingParams(temperature=1.0)
    with torch.inference_mode():
        p1 = target_distribution(target(torch.tensor([prompt])).logits[0, -1], sampling)
        d1 = int(p1.argmax())
        p2 = target_distribution(target(torch.tensor([prompt + [d1]])).logits[0, -1], sampling)
    likely = p2.topk(2).indices.tolist()  # d2's q: its two likeliest, 0.6 / 0.4 (p2 differs: the rule must work)
    q = pb.DraftProbabilities(token_ids=likely, probs=[0.6, 0.4])
    other = likely[1] if likely[1] != d1 else likely[0]
    wrong = pb.DraftProbabilities(token_ids=[d1, other], probs=[0.1, 0.9])
    identity = pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(smollm2_tokenizer))
    firsts, seconds, verified = [], [], []
    lock = threading.Lock()

    def session(stub: pb_grpc.WispStub, seed: int) -> None:
        d2 = likely[0] if random.Random(seed).random() < 0.6 else likely[1]  # sampled from q, as an edge must
        opening = pb.OpenSession(
            draft_model=identity,
            prompt_token_ids=prompt,
            sampling=pb.SamplingParams(temperature=1.0, seed=seed),
            stop=pb.StopCondition(max_new_tokens=3, ignore_eos=True),  # room for d2 and the token after it
            server_paced=True,
        )
        round_ = pb.DraftRound(position=len(prompt), token_ids=[d1, d2], draft_probabilities=[wrong, q])
        requests = [pb.SpeculateRequest(open=opening), pb.SpeculateRequest(draft=round_)]
        verdicts = [r.verdict for r in stub.Speculate(iter(requests), timeout=30)][1:]
        tokens = [
            t for v in verdicts for t in [*v.accepted_token_ids, *([v.next_token] if v.HasField("next_token") else [])]
        ]
        assert verdicts[0].num_drafts == 0
        with lock:
            firsts.append(tokens[0])
            if tokens[0] == d1:
                seconds.append(tokens[1])
                verified.append(verdicts[1].num_drafts)

    with running_server(path, engine="hf", max_sessions=8, profile_estimator=False) as server:
        stub = pb_grpc.WispStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        workers = [
            threading.Thread(target=lambda i=i: [session(stub, s) for s in range(1 + i, sessions + 1, 4)])
            for i in range(4)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert len(firsts) == sessions
    # Most second steps verified d2: the round came with the opening, so it was mostly in by then (where the
    # stream's reader had not passed it on yet, the step decoded alone; either way the target's distribution).
    assert len(verified) > 50 and sum(verified) > 0.5 * len(verified)
    for tokens, p in ((firsts, p1), (seconds, p2)):
        counts = torch.bincount(torch.tensor(tokens), minlength=vocab).float()
        expected = p * len(tokens)
        rare = expected < 5  # chi-square wants at least 5 expected per cell: the rare tokens share one
        counts = torch.cat([counts[~rare], counts[rare].sum()[None]])
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
        assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
