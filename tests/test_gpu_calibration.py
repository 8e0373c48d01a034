"""The modeled-GPU calibration: the random-weight decoder has the target's shape, and the fit finds what it should."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_calibration import RandomDecoder, Shape, fit_points, grid, time_shape
from wisp_server.engines.modeled_engine import GPU_MODELS_PATH, known_gpu_models, load_gpu_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", known_gpu_models())
def test_the_random_decoder_has_the_targets_published_parameter_count(name):
    """Built on the meta device: the shape of a 32B model without its memory."""
    target = load_gpu_model(name).target
    assert RandomDecoder(target, "meta").parameters() == target.parameters


def test_a_step_of_a_small_decoder_gives_every_new_tokens_logits():
    target = replace(
        load_gpu_model("h100-sxm/llama-3.1-8b").target,
        layers=2, hidden_size=64, intermediate_size=128, attention_heads=8, kv_heads=2, head_dim=16, vocab_size=100,
        parameters=2 * (64 * (128 + 64) + 128 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 100 * 64 + 64,
    )  # fmt: skip
    decoder = RandomDecoder(target, "cpu", dtype=torch.float32)
    shape = Shape(sessions=3, new_tokens=4, context=7)
    ids = torch.randint(0, 100, (3, 4))
    assert decoder.step(ids, decoder.kv_cache(shape), decoder.rotary(shape)).shape == (3, 4, 100)
    assert time_shape(decoder, Shape(1, 5, 0), repeats=2, graphs=False)["eager_s"] > 0


def test_the_fit_recovers_known_constants():
    cost = load_gpu_model("h200/qwen3-32b")
    shapes = grid(200_000)
    truth = replace(cost, gpu=replace(cost.gpu, memory_efficiency=0.7, compute_efficiency=0.45, step_overhead_s=0.002))
    fit = fit_points(cost, shapes, [truth.step_seconds(s.shapes()) for s in shapes])
    assert (fit.memory_efficiency, fit.compute_efficiency) == pytest.approx((0.7, 0.45), abs=0.003)
    assert fit.fixed_s == pytest.approx(0.002, abs=1e-4)
    assert fit.max_relative_error < 0.01


def test_every_committed_calibration_refits_from_its_committed_measurements():
    table = json.loads(GPU_MODELS_PATH.read_text())
    calibrated = {name: entry["calibration"] for name, entry in table["models"].items() if entry["calibration"]}
    assert "h200/qwen3-32b" in calibrated
    for name, calibration in calibrated.items():
        recorded = json.loads((ROOT / calibration["data"]).read_text())
        assert recorded["model"] == name and len(recorded["points"]) == calibration["points"]
        shapes = [Shape(p["sessions"], p["new_tokens"], p["context"]) for p in recorded["points"]]
        fit = fit_points(load_gpu_model(name), shapes, [p["graph_s"] for p in recorded["points"]])
        assert fit.memory_efficiency == pytest.approx(calibration["memory_efficiency"], abs=1e-3)
        assert fit.compute_efficiency == pytest.approx(calibration["compute_efficiency"], abs=1e-3)
        assert fit.fixed_s == pytest.approx(calibration["gpu_fixed_s"], abs=1e-5)
        assert fit.median_relative_error == pytest.approx(calibration["median_relative_error"], abs=1e-3)
        assert load_gpu_model(name).gpu.step_overhead_s == calibration["step_overhead_s"]
