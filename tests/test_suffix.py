"""Suffix decoding on the edge: what the index proposes, how far, within what memory, and what it may remember."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from helpers import tiny_llama

from wisp_edge.controller import AcceptancePredictor
from wisp_edge.drafter import CopyDrafter, DraftSignals, ModelDrafter
from wisp_edge.lookup import PromptLookup
from wisp_edge.suffix import SuffixDecoding, SuffixHistory, SuffixTrie, prompt_key

THE_CAT = [10, 11, 12, 13, 10, 14, 15]  # "the cat sat on the mat ."


def test_the_index_proposes_what_followed_the_longest_match():
    trie = SuffixTrie(depth=8)
    trie.add(THE_CAT + [10, 11, 12, 13, 10, 14, 15])
    # "... on the" matched (4 tokens back, "sat on the"): "mat ." followed it both times.
    proposal = trie.speculate([99, 12, 13, 10], max_tokens=4, min_probability=0.1)
    assert proposal.tokens[:2] == [14, 15] and proposal.match_length == 3
    assert proposal.probabilities[:2] == [2 / 3, 4 / 9]  # seen twice each, plus one unseen continuation
    # "the" alone was followed by "cat" twice and "mat" twice: the longer match decides, not the shorter one.
    assert trie.speculate([99, 13, 10], 4, 0.1).tokens[0] == 14
    assert trie.speculate([77, 88], 4, 0.1).tokens == []  # never seen


def test_a_streamed_text_counts_as_the_same_text_added_at_once():
    tokens = [random.Random(3).randrange(6) for _ in range(200)]
    whole, streamed = SuffixTrie(6), SuffixTrie(6)
    whole.add(tokens)
    for start in range(0, len(tokens), 7):
        streamed.extend(tokens[start : start + 7])
    assert whole.nbytes == streamed.nbytes == whole.measure() == streamed.measure()
    for context in ([1, 2], [3, 3, 4], tokens[-5:]):
        assert whole.speculate(context, 5, 0.0) == streamed.speculate(context, 5, 0.0)


def test_frequency_drives_how_far_the_index_proposes():
    pattern, settled = [1, 2, 3], [4, 5, 6, 7, 8, 9]
    reliable, unreliable = SuffixTrie(16), SuffixTrie(16)
    for i in range(8):
        reliable.add(pattern + settled)
        # After the pattern the continuation agrees for one token, then splits four ways.
        unreliable.add(pattern + [4, 20 + i % 4, 30, 31, 32, 33])
    context = [0, *pattern]
    long_run = reliable.speculate(context, max_tokens=6, min_probability=0.1)
    short_run = unreliable.speculate(context, max_tokens=6, min_probability=0.3)
    assert long_run.tokens == settled[:3]  # as long as the match (3 tokens), each step 8 times in 8 (8/9)
    assert short_run.tokens == [4]  # the next step is right one time in four: under 0.3, it stops
    assert short_run.score < long_run.score
    # The same pattern seen once: half a chance for its first token, a quarter for two.
    rare = SuffixTrie(16)
    rare.add(pattern + settled)
    assert rare.speculate(context, 6, 0.3).tokens == [4]
    assert reliable.speculate(context, 6, 0.3).tokens == settled[:3]
    # A longer match allows a longer proposal, the round's cap still holds.
    assert reliable.speculate([*pattern, 4, 5], 6, 0.1).tokens == [6, 7, 8, 9]
    assert reliable.speculate([*pattern, 4, 5], 2, 0.1).tokens == [6, 7]


def zipf_text(rng: random.Random, length: int) -> list[int]:
    """Token ids with a word-like frequency law: a few very common, a long tail."""
    return [int(rng.paretovariate(1.1)) % 49152 for _ in range(length)]


def test_the_history_stays_within_its_byte_bound_forgetting_the_oldest_first():
    bound = 2_000_000
    history = SuffixHistory(bound, depth=16)
    rng = random.Random(0)
    answers = [zipf_text(rng, rng.randrange(20, 160)) for _ in range(300)]
    for i, answer in enumerate(answers):
        history.add(i, answer)
        assert history.nbytes <= bound
        if i % 10 == 0:  # (the recount walks the whole trie)
            assert history.trie.nbytes == history.trie.measure()
    assert 5 < len(history) < len(answers)  # it had to forget, and it kept what fits
    # The newest answers are the ones remembered, and the index holds nothing of the forgotten ones.
    kept = [tokens.tolist() for _, tokens in history._answers]
    assert kept == answers[-len(kept) :]
    rebuilt = SuffixTrie(16)
    for answer in kept:
        rebuilt.add(answer)
    assert counts(rebuilt) == counts(history.trie)


def counts(trie: SuffixTrie) -> dict[tuple[int, ...], int]:
    """Every indexed substring and its count."""
    found, stack = {}, [((), trie.root)]
    while stack:
        path, node = stack.pop()
        for token, child in (node.children or {}).items():
            found[(*path, token)] = child.count
            stack.append(((*path, token), child))
    return found


def test_the_byte_count_covers_what_python_allocates():
    """The documented count (sys.getsizeof of every owned object) against tracemalloc: the count is no
    underestimate of the memory the trie holds."""
    rng = random.Random(1)
    texts = [zipf_text(rng, 120) for _ in range(40)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    trie = SuffixTrie(16)
    for text in texts:
        trie.add(text)
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert traced <= trie.nbytes <= 2 * traced


def decoder_answering(decoder, prompt: list[int], previous: list[int]):
    decoder.start(prompt, previous=previous)
    return decoder


def test_a_benchmark_history_never_holds_an_answer_to_the_prompt_being_answered():
    prompt_a, answer_a = [1, 2, 3], [40, 41, 42, 43, 44, 45]
    prompt_b, answer_b = [7, 8, 9], [50, 51, 52]
    for forget in (True, False):
        decoder = SuffixDecoding(forget_same_prompt=forget, min_probability=0.0).decoder()
        decoder.start(prompt_a)
        decoder.start(prompt_b, previous=prompt_a + answer_a)  # answer_a joins the history
        assert len(decoder.history) == 1
        decoder.start(prompt_a, previous=prompt_b + answer_b)  # prompt_a again: a rerun of the same prompts
        remembered = decoder.speculate([*prompt_a, 40, 41]).tokens
        if forget:
            assert len(decoder.history) == 1 and remembered == []
            assert decoder.history.trie.speculate([50, 51], 4, 0.0).tokens == [52]  # other answers stay
        else:
            assert remembered == [42, 43]
    assert prompt_key(prompt_a) == prompt_key(list(prompt_a)) != prompt_key(prompt_b)


def test_the_drafter_takes_the_suffix_token_where_it_is_surer_than_the_draft():
    model = tiny_llama(500, layers=1, seed=3)
    context = [10, 11, 12, 13, 14, 15, 10, 11, 12]  # the suffix index proposes 13, 14, 15
    plain = ModelDrafter(model)
    plain.start(context)
    own = plain.draft(3)
    drafter = ModelDrafter(model, suffix=SuffixDecoding(min_probability=0.0).decoder())
    drafter.start(context)
    assert drafter.draft(3) == [13, 14, 15] != own
    assert all(s.lookup and s.suffix == 0.5 for s in drafter.signals)  # each seen once: right half the time
    # A verdict that leaves the proposal: the index matches the new context, which it never saw, so the draft
    # drafts on its own.
    drafter.commit(1, 99)
    assert drafter.tokens[-2:] == [13, 99] and drafter.pending == []
    plain.start([*context, 13, 99])
    assert drafter.draft(1) == plain.draft(1) and drafter.signals[0].suffix == 0.0


def test_copy_drafters_draft_only_what_their_source_copies():
    context = [5, 6, 7, 8, 9, 5, 6, 7]
    lookup_only = CopyDrafter(lookup=PromptLookup(max_ngram=4, below=1.0))
    lookup_only.start(context)
    assert lookup_only.draft(4) == [8, 9, 5, 6]  # one token per match, matched again after each
    suffix_only = CopyDrafter(suffix=SuffixDecoding(min_probability=0.0, max_tokens=4).decoder())
    suffix_only.start(context)
    assert suffix_only.draft(4) == [8, 9, 5, 6]
    nothing = CopyDrafter(suffix=SuffixDecoding().decoder())
    nothing.start([1, 2, 3])
    assert nothing.draft(4) == []  # nothing to copy: the round goes without drafts


def test_the_controller_learns_how_far_to_trust_the_suffix_index():
    """Suffix tokens are accepted about as often as the index estimates, whatever the draft thought of them: the
    fitted predictor puts weight on the suffix feature, and predicts them better than the prior, which has none."""
    rng = random.Random(5)
    rows = []
    for _ in range(4000):
        top1, position = rng.uniform(0.05, 0.95), rng.randrange(4)
        if rng.random() < 0.4:  # proposed by the suffix index, with its estimate
            estimate = rng.uniform(0.1, 1.0)
            rows.append(
                (DraftSignals(top1, 1.0, top1 / 2, lookup=True, suffix=estimate), position, rng.random() < estimate)
            )
        else:
            rows.append((DraftSignals(top1, 1.0, top1 / 2), position, rng.random() < top1))
    fitted = AcceptancePredictor.fit(rows[:3000])
    assert fitted.weights[6] > 2.0
    assert fitted.log_loss(rows[3000:]) < AcceptancePredictor().log_loss(rows[3000:]) - 0.02


@pytest.mark.parametrize("depth", [1, 0])
def test_a_trie_needs_room_for_a_match_and_a_proposal(depth):
    with pytest.raises(ValueError):
        SuffixTrie(depth)


def test_the_edge_config_switches_and_bounds_suffix_decoding():
    from wisp_common.config import EdgeConfig

    assert SuffixDecoding.of(EdgeConfig()) is None  # off unless asked for
    settings = SuffixDecoding.of(EdgeConfig(suffix=True, suffix_max_bytes=10_000, suffix_max_depth=8, draft_tokens=6))
    assert settings is not None and (settings.depth, settings.max_tokens) == (8, 6)
    decoder = settings.decoder()
    assert decoder.history.max_bytes == 10_000 and decoder.history.trie.depth == 8
    assert settings.decoder().history is not decoder.history  # each drafter (device) keeps its own
