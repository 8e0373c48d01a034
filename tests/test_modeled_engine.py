"""The modeled GPU regime: exact greedy verdicts from recorded answers, batch time from a roofline.

The verdicts are checked against the real hf engine on a tiny random target, round by round;
the cost model against the formula of docs/modeled-gpu.md evaluated here from the raw constants
of gpu_models.json; the engine's sleep against the wall clock.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from helpers import reference_greedy, tiny_llama

from wisp_common.request import SamplingParams
from wisp_server.engines.base import EngineFull, EngineInfo, RoundRequest
from wisp_server.engines.hf_engine import HFVerificationEngine
from wisp_server.engines.modeled_engine import (
    GPU_MODELS_PATH,
    AnswerExhausted,
    GpuCostModel,
    ModeledVerificationEngine,
    known_gpu_models,
    load_answers,
    load_gpu_model,
)
from wisp_server.estimator import SequenceShape

VOCAB = 512
NEW_TOKENS = 24
MAX_DRAFTS = 6
INFO = EngineInfo("tiny", VOCAB, None, "fp")
A100 = "a100-80gb/qwen3-32b"


def instant(model: GpuCostModel) -> GpuCostModel:
    """The same model with (practically) zero step time, for tests about verdicts."""
    gpu = dataclasses.replace(model.gpu, memory_bandwidth=1e30, peak_flops=1e30, step_overhead_s=0.0)
    return dataclasses.replace(model, gpu=gpu)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(VOCAB, layers=2, seed=0, hidden=128, heads=2)


# ---------------------------------------------------------------------------------------------------------------------
# Verdicts


def test_verdicts_equal_the_real_engines_round_by_round(target):
    """Same rounds to the hf engine and the modeled one: every verdict and uncached count identical.

    Sessions join one per step (batches mix first rounds with later ones), one resumes with tokens
    already committed, drafts are fully right, right then wrong, wrong at once, or empty.
    """
    rng = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=rng).tolist() for n in (3, 17, 8, 29, 1, 12)]
    answers = {tuple(p): reference_greedy(target, p, NEW_TOKENS + MAX_DRAFTS + 1) for p in prompts}
    # Session 5 resumes: its context already holds the first 4 tokens of its answer.
    contexts = [list(p) for p in prompts]
    contexts[5] += answers[tuple(prompts[5])][:4]
    real = HFVerificationEngine(target, INFO)
    modeled = ModeledVerificationEngine(INFO, answers, instant(load_gpu_model(A100)))

    generated = [len(c) - len(p) for c, p in zip(contexts, prompts)]
    outputs = [list(c[len(p) :]) for c, p in zip(contexts, prompts)]
    kinds = {"right": 0, "partly": 0, "wrong": 0, "empty": 0}
    joined: list[int] = []
    step = 0
    while len(joined) < len(prompts) or any(generated[i] < NEW_TOKENS for i in joined):
        if step < len(prompts):
            for engine in (real, modeled):
                engine.add_session(str(step), contexts[step], SamplingParams(), 256)
            joined.append(step)
        active = [i for i in joined if generated[i] < NEW_TOKENS]
        requests = []
        for i in active:
            right = answers[tuple(prompts[i])][generated[i] : generated[i] + MAX_DRAFTS]
            kind = ["right", "partly", "wrong", "empty"][int(torch.randint(0, 4, (1,), generator=rng))]
            k = int(torch.randint(1, MAX_DRAFTS + 1, (1,), generator=rng))
            if kind == "right":
                drafts = right[:k]
            elif kind == "partly":
                cut = int(torch.randint(0, k, (1,), generator=rng))
                drafts = right[:cut] + [
                    (right[cut] + 1 + int(torch.randint(0, VOCAB - 1, (1,), generator=rng))) % VOCAB
                ]
            elif kind == "wrong":
                drafts = [(right[0] + 7) % VOCAB] + right[1:k]
            else:
                drafts = []
            kinds[kind] += 1
            requests.append(RoundRequest(str(i), tuple(drafts)))
        for i in active:
            assert modeled.uncached_tokens(str(i)) == real.uncached_tokens(str(i)), (step, i)
        got_real, got_modeled = real.verify(requests), modeled.verify(requests)
        for i, request, a, b in zip(active, requests, got_real, got_modeled):
            assert (b.num_accepted, b.next_token) == (a.num_accepted, a.next_token), (step, i, request.drafts)
            assert b.features is None
            outputs[i] += list(request.drafts[: a.num_accepted]) + [a.next_token]
            generated[i] += a.num_accepted + 1
            if generated[i] >= NEW_TOKENS:
                real.remove_session(str(i))
                modeled.remove_session(str(i))
        step += 1

    for prompt, output in zip(prompts, outputs):  # the real engine is lossless, so both follow the recorded answers
        assert output[:NEW_TOKENS] == answers[tuple(prompt)][:NEW_TOKENS]
    assert min(kinds.values()) >= 3, kinds  # every kind of round really ran


def test_a_round_shape_counts_the_whole_uncached_context_then_one_token():
    answers = {(1, 2, 3): list(range(10, 40))}
    engine = ModeledVerificationEngine(INFO, answers, instant(load_gpu_model(A100)))
    engine.add_session("s", [1, 2, 3, 10, 11], SamplingParams(), 64)  # resumed: 2 tokens committed
    assert engine.uncached_tokens("s") == 5
    first = RoundRequest("s", (12, 13, 99))
    assert engine.step_shapes([first]) == [SequenceShape(0, 5 + 3)]  # prefill of the whole context
    verdict = engine.verify([first])[0]
    assert (verdict.num_accepted, verdict.next_token) == (2, 14)
    assert engine.uncached_tokens("s") == 1
    assert engine.step_shapes([RoundRequest("s", (15,))]) == [SequenceShape(5 + 2, 1 + 1)]
    verdict = engine.verify([RoundRequest("s", (15,))])[0]
    assert (verdict.num_accepted, verdict.next_token) == (1, 16)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture
def small_engine():
    answers = {(1, 2, 3): [7, 8, 9, 10], (5, 6): [20, 21, 22, 23, 24, 25]}
    return ModeledVerificationEngine(INFO, answers, instant(load_gpu_model(A100)))


def test_refuses_sampling(small_engine):
    with pytest.raises(ValueError, match="greedy-only"):
        small_engine.add_session("s", [1, 2, 3], SamplingParams(temperature=0.7), 64)


def test_refuses_features(small_engine):
    with pytest.raises(ValueError, match="no features"):
        small_engine.add_session("s", [1, 2, 3], SamplingParams(), 64, features=True)


def test_refuses_an_unrecorded_prompt(small_engine):
    with pytest.raises(ValueError, match="not recorded"):
        small_engine.add_session("s", [1, 2], SamplingParams(), 64)  # a prefix of a recorded prompt is not one
    with pytest.raises(ValueError, match="not recorded"):
        small_engine.add_session("s", [4, 1, 2, 3], SamplingParams(), 64)


def test_refuses_a_context_that_left_the_recorded_answer(small_engine):
    with pytest.raises(ValueError, match="leave the recorded greedy answer at generated token 1"):
        small_engine.add_session("s", [1, 2, 3, 7, 99], SamplingParams(), 64)


def test_running_past_the_recorded_answer_raises_and_advances_no_session(small_engine):
    small_engine.add_session("short", [1, 2, 3], SamplingParams(), 64)
    small_engine.add_session("other", [5, 6], SamplingParams(), 64)
    assert small_engine.verify([RoundRequest("short", (7, 8))])[0].next_token == 9
    with pytest.raises(AnswerExhausted, match="ran past its recorded answer of 4 tokens"):
        small_engine.verify([RoundRequest("other", (20,)), RoundRequest("short", (10,))])  # 10 needs a 5th token
    assert small_engine.uncached_tokens("other") == 2  # the failed batch advanced nobody
    verdict = small_engine.verify([RoundRequest("other", (20,)), RoundRequest("short", ())])
    assert [(v.num_accepted, v.next_token) for v in verdict] == [(1, 21), (0, 10)]
    with pytest.raises(AnswerExhausted):
        small_engine.verify([RoundRequest("short", ())])


def test_an_optional_kv_capacity_reserves_each_sessions_max_tokens():
    answers = {(1, 2, 3): [7, 8, 9, 10], (5, 6): [20, 21, 22]}
    engine = ModeledVerificationEngine(INFO, answers, instant(load_gpu_model(A100)), kv_capacity_tokens=100)
    engine.add_session("a", [1, 2, 3], SamplingParams(), 60)
    with pytest.raises(EngineFull, match="holds 100 tokens, 60 are reserved"):
        engine.add_session("b", [5, 6], SamplingParams(), 41)
    engine.add_session("b", [5, 6], SamplingParams(), 40)
    engine.remove_session("a")
    engine.add_session("c", [1, 2, 3], SamplingParams(), 60)


# ---------------------------------------------------------------------------------------------------------------------
# The cost model, against the formula evaluated here from the raw constants


def raw(name: str) -> dict[str, float]:
    """The formula's inputs read straight from gpu_models.json, not through the loader."""
    table = json.loads(GPU_MODELS_PATH.read_text())
    entry = table["models"][name]
    gpu, target = table["gpus"][entry["gpu"]], table["targets"][entry["target"]]
    v = {k: e["value"] for k, e in {**gpu, **target, **entry}.items() if isinstance(e, dict)}
    lookup = 0 if v["tie_word_embeddings"] else v["vocab_size"] * v["hidden_size"]
    matmul = v["parameters"] - lookup
    bandwidth = v["memory_bandwidth_bytes_per_s"] * v["memory_efficiency"]
    flops = v["peak_bf16_flops_per_s"] * v["compute_efficiency"]
    return {
        "weights_s": matmul * v["bytes_per_parameter"] / bandwidth,  # reading the weights once
        "token_s": 2 * matmul / flops,  # multiplying one token by them
        "kv_token_s": 2 * v["layers"] * v["kv_heads"] * v["head_dim"] * v["bytes_per_kv_element"] / bandwidth,
        "attention_s": 4 * v["layers"] * v["attention_heads"] * v["head_dim"] / flops,  # per query-key pair
        "overhead_s": v["step_overhead_s"],
    }


def test_one_sequence_is_flat_in_new_tokens_until_the_crossover_then_linear():
    cost, r = load_gpu_model(A100), raw(A100)
    crossover = r["weights_s"] / r["token_s"]  # new tokens at which computing them takes as long as reading W
    assert 80 < crossover < 150  # the papers' point: a 32B target on an A100 turns compute-bound near 100 tokens

    def step(n: int) -> float:
        return cost.step_seconds([SequenceShape(0, n)])

    for n in (2, 10, int(0.8 * crossover)):
        assert step(n) == pytest.approx(step(1), rel=0.02), n  # flat: the weights dominate
    for n in (int(1.5 * crossover), 3 * int(crossover)):
        assert step(n) - r["overhead_s"] == pytest.approx(n * r["token_s"], rel=0.02), n  # linear in tokens
    assert cost.step_cost([SequenceShape(0, int(0.9 * crossover))]).compute_bound is False
    assert cost.step_cost([SequenceShape(0, int(1.1 * crossover))]).compute_bound is True


def test_a_batch_turns_compute_bound_where_the_formula_says():
    cost, r = load_gpu_model(A100), raw(A100)
    context, n = 1000, 5
    # Per session: compute of n tokens (weights and attention) against the KV it reads and writes.
    per_session_compute = n * r["token_s"] + r["attention_s"] * (n * context + n * (n + 1) / 2)
    per_session_memory = (context + n) * r["kv_token_s"]
    sessions = r["weights_s"] / (per_session_compute - per_session_memory)
    assert 10 < sessions < 40

    def batch(s: int, tokens: int) -> float:
        return cost.step_seconds([SequenceShape(context, tokens)] * s)

    below, above = int(sessions * 0.8), int(sessions * 1.25) + 1
    assert not cost.step_cost([SequenceShape(context, n)] * below).compute_bound
    assert cost.step_cost([SequenceShape(context, n)] * above).compute_bound
    assert batch(8, 5) < 1.2 * batch(8, 1)  # 40 tokens: verifying drafts costs about nothing
    assert batch(256, 5) > 2 * batch(256, 1)  # 1280 tokens: every token costs compute
    expected = r["overhead_s"] + max(
        r["weights_s"] + 64 * per_session_memory, 64 * per_session_compute
    )  # the formula, once, in full
    assert batch(64, 5) == pytest.approx(expected, rel=1e-9)


def test_kv_reads_grow_with_context():
    cost, r = load_gpu_model(A100), raw(A100)
    short = cost.step_cost([SequenceShape(0, 1)] * 8)
    long = cost.step_cost([SequenceShape(4000, 1)] * 8)
    assert not long.compute_bound
    assert long.seconds - short.seconds == pytest.approx(8 * 4000 * r["kv_token_s"], rel=1e-9)
    assert long.seconds > 1.1 * short.seconds


def test_every_named_model_loads_and_a_faster_gpu_is_faster():
    assert {A100, "h100-sxm/llama-3.1-8b", "h200/qwen3-32b"} <= set(known_gpu_models())
    decode = [SequenceShape(1000, 1)]
    a100, h200 = load_gpu_model(A100), load_gpu_model("h200/qwen3-32b")
    assert h200.step_seconds(decode) < a100.step_seconds(decode)
    assert load_gpu_model("h100-sxm/llama-3.1-8b").step_seconds(decode) < h200.step_seconds(decode)
    assert a100.step_seconds([]) == 0.0


def test_every_constant_carries_a_source_and_a_calibration_says_where_it_was_measured():
    table = json.loads(GPU_MODELS_PATH.read_text())
    for section in ("gpus", "targets"):
        for name, entry in table[section].items():
            for key, item in entry.items():
                if key != "name":
                    assert isinstance(item, dict) and item["source"].strip(), (section, name, key)
    for name, entry in table["models"].items():
        for key in ("memory_efficiency", "compute_efficiency", "step_overhead_s"):
            assert entry[key]["source"].startswith("ASSUMPTION"), (name, key)
        calibration = entry["calibration"]
        if calibration is not None:  # benchmarks/gpu_calibration.py: tests/test_gpu_calibration.py refits it
            assert {"measured_on", "date", "points", "median_relative_error", "data"} <= set(calibration), name
    assert table["models"]["a100-80gb/qwen3-32b"]["calibration"] is None  # no A100 has been lent: still assumed


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="a100-80gb/qwen3-32b.*h200/qwen3-32b"):
        load_gpu_model("a100/qwen3-32b")


def test_a_filled_calibration_replaces_the_assumed_efficiencies(tmp_path):
    table = json.loads(GPU_MODELS_PATH.read_text())
    table["models"][A100]["calibration"] = {
        "memory_efficiency": 0.5,
        "compute_efficiency": 0.4,
        "step_overhead_s": 0.001,
        "measured_on": "test",
    }
    path = tmp_path / "gpu_models.json"
    path.write_text(json.dumps(table))
    calibrated = load_gpu_model(A100, path)
    assert (calibrated.gpu.memory_efficiency, calibrated.gpu.compute_efficiency) == (0.5, 0.4)
    assert calibrated.gpu.step_overhead_s == 0.001
    assert calibrated.step_seconds([SequenceShape(0, 1)]) > load_gpu_model(A100).step_seconds([SequenceShape(0, 1)])


# ---------------------------------------------------------------------------------------------------------------------
# The sleep


def test_verify_lasts_the_modeled_time():
    cost = load_gpu_model(A100)
    engine = ModeledVerificationEngine(INFO, {(1, 2, 3): list(range(10, 60))}, cost)
    engine.add_session("s", [1, 2, 3], SamplingParams(), 64)
    for drafts in ((10, 11, 99), (13, 14, 15, 16, 17)):
        request = RoundRequest("s", drafts)
        modeled = cost.step_seconds(engine.step_shapes([request]))
        assert modeled > 0.04  # the A100/32B decode step: ~42 ms
        start = time.perf_counter()
        engine.verify([request])
        elapsed = time.perf_counter() - start
        assert engine.last_step is not None and engine.last_step.seconds == modeled
        assert modeled - 0.001 <= elapsed <= modeled + 0.015, (elapsed, modeled)


# ---------------------------------------------------------------------------------------------------------------------
# Recorded answers


def test_load_answers_reads_the_recorders_format(tmp_path):
    path = tmp_path / "answers.jsonl"
    lines = [
        {"prompt_token_ids": [1, 2, 3], "answer_token_ids": [7, 8]},
        {"prompt_token_ids": [4], "answer_token_ids": [5, 6, 7]},
        {"prompt_token_ids": [1, 2, 3], "answer_token_ids": [7, 8, 9]},  # a longer recording of the same prompt
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert load_answers(path) == {(1, 2, 3): [7, 8, 9], (4,): [5, 6, 7]}

    path.write_text(json.dumps({"prompt_token_ids": [1], "answer_token_ids": [2]}) + "\n" + '{"prompt": [1]}\n')
    with pytest.raises(ValueError, match=":2: expected"):
        load_answers(path)
    path.write_text(
        "\n".join(json.dumps({"prompt_token_ids": [1], "answer_token_ids": answer}) for answer in ([2, 3], [2, 4]))
    )
    with pytest.raises(ValueError, match="different answer"):
        load_answers(path)
