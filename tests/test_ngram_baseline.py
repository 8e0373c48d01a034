"""vLLM's n-gram speculation for the target served alone (`--generate-speculation`): the baseline a vLLM user
would pick instead of edge drafting. Its option reads as vLLM's own, its proposals are vLLM's, and it is lossless
on both engines."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import grpc
import pytest
from helpers import assert_greedy_equal, reference_greedy, running_server

from wisp_common.config import DEFAULT_TARGET
from wisp_common.models import load_causal_lm
from wisp_common.prompts import encode_prompt
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_server.ngram import VLLM_NGRAM_EXAMPLE, NgramSpeculation
from wisp_server.server import main as server_main


def test_the_option_reads_as_vllms_speculative_config():
    assert NgramSpeculation.parse("") is None
    assert NgramSpeculation.parse(VLLM_NGRAM_EXAMPLE) == NgramSpeculation(5, 4, 4)  # min defaults to max
    assert NgramSpeculation.parse('{"method": "ngram", "num_speculative_tokens": 3}') == NgramSpeculation(3, 5, 5)
    spec = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "prompt_lookup_max": 3}'
    assert NgramSpeculation.parse(spec) == NgramSpeculation(2, 2, 3)
    for bad, words in [
        ("ngram", "not JSON"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', 'method "ngram" only'),
        ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', re.escape("unknown keys ['model']")),
        ('{"method": "ngram"}', "num_speculative_tokens >= 1"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}', "<="),
    ]:
        with pytest.raises(ValueError, match=words):
            NgramSpeculation.parse(bad)


def test_the_server_refuses_a_bad_option_before_it_loads_anything(capsys):
    with pytest.raises(SystemExit) as exit:
        server_main(["--generate-speculation", '{"method": "medusa"}', "--target-model", "/nonexistent"])
    assert exit.value.code == 2
    assert 'method "ngram" only' in capsys.readouterr().err


def test_proposals_follow_the_longest_earlier_match_and_stop_at_the_sessions_room():
    ngram = NgramSpeculation(num_speculative_tokens=3, prompt_lookup_min=2, prompt_lookup_max=3)
    context = [7, 1, 2, 3, 9, 8, 5, 1, 2, 3, 4, 6, 1, 2, 3]
    # The suffix 1 2 3 occurred twice; vLLM drafts from the earliest, the tokens after it: 9 8 5.
    assert ngram.propose(context, room=10) == [9, 8, 5]
    assert ngram.propose(context, room=3) == [9, 8]  # a round commits its drafts and one more token
    assert ngram.propose(context, room=1) == []
    assert ngram.propose([1, 2, 3, 4], room=10) == []  # no earlier match


VLLM_SAYS = """
import json, random, sys
import numpy as np
from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as vllm_propose
rng, cases = random.Random(0), []
for _ in range(3000):
    context = [rng.randrange(rng.choice((2, 4, 30))) for _ in range(rng.randrange(1, 60))]
    k, low = rng.randint(1, 6), rng.randint(1, 4)
    high, room = rng.randint(low, 6), rng.randint(1, 8)
    limit = len(context) + room - 1
    drafts = vllm_propose(np.asarray(context, dtype=np.int32), low, high, limit, k)
    cases.append([context, k, low, high, room, [int(t) for t in drafts]])
json.dump(cases, sys.stdout)
"""


def test_proposals_are_vllms_own():
    """3000 random contexts (small vocabularies, so matches of every length occur) through vLLM's proposer, in a
    subprocess (it loads numba), against ours."""
    out = subprocess.run([sys.executable, "-c", VLLM_SAYS], capture_output=True, text=True, check=True).stdout
    cases = json.loads(out)
    assert sum(1 for *_, drafts in cases if drafts) > 500
    for context, k, low, high, room, drafts in cases:
        assert NgramSpeculation(k, low, high).propose(context, room) == drafts, (context, k, low, high, room)


@pytest.fixture(scope="module")
def default_target():
    return load_causal_lm(DEFAULT_TARGET)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_generate_with_ngram_speculation_is_target_only_decoding(smollm2_tokenizer, default_target, engine):
    """The default target copying a list: token for token its greedy answer, with rounds that committed several
    tokens (accepted n-gram drafts)."""
    text = "Repeat this list exactly, twice: apples, pears, plums, cherries, grapes, lemons, limes, figs."
    prompt = encode_prompt(smollm2_tokenizer, text, chat=True)
    options = {"engine": engine, "generate_speculation": VLLM_NGRAM_EXAMPLE, "max_draft_tokens": 5}
    with running_server(DEFAULT_TARGET, **options) as server:
        stub = pb_grpc.WispStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        request = pb.GenerateRequest(prompt_token_ids=prompt, stop=pb.StopCondition(max_new_tokens=40, ignore_eos=True))
        responses = list(stub.Generate(request, timeout=300))
    tokens = [t for r in responses for t in r.token_ids]
    assert_greedy_equal(default_target, prompt, tokens, reference_greedy(default_target, prompt, 40))
    assert responses[-1].finished and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert max(len(r.token_ids) for r in responses) > 1, "no n-gram draft was ever accepted"
