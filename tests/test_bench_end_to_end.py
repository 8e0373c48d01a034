"""wisp-bench end to end on the real SmolLM2 pair: the replay validated against real edge processes, and a small
sweep in both regimes through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wisp_bench.record import RecordSettings, record
from wisp_bench.workload import load_workload_prompts
from wisp_common.config import DEFAULT_DRAFT, DEFAULT_TARGET
from wisp_common.models import load_tokenizer
from wisp_common.prompts import encode_prompt

pytestmark = pytest.mark.slow

PROMPTS, TOKENS, DRAFTS = 4, 24, 3


@pytest.fixture(scope="module")
def workload():
    """A few MT-Bench prompts recorded with the hf engine (cached: the sweeps below find the same recording)."""
    prompts = load_workload_prompts(limit=PROMPTS)
    tokenizer = load_tokenizer(DEFAULT_DRAFT)
    ids = [encode_prompt(tokenizer, p.text, chat=True) for p in prompts]
    settings = RecordSettings(DEFAULT_TARGET, DEFAULT_DRAFT, TOKENS, 2 * DRAFTS, "float32", "hf")
    return prompts, ids, record(settings, ids)


def test_replayed_devices_commit_what_real_edges_commit_in_the_same_rounds(workload, tmp_path):
    from wisp_bench.cli import draft_identity, warm_up
    from wisp_bench.validate import validate
    from wisp_common.eagle import features_read
    from wisp_common.models import resolve_model
    from wisp_edge.controller import AcceptancePredictor
    from wisp_server.launcher import ServerProcess

    prompts, ids, recordings = workload
    assert [r.prompt for r in recordings] == ids and all(len(r.chains) == TOKENS for r in recordings)
    args = ["--target-model", DEFAULT_TARGET, "--engine", "hf", "--dtype", "float32", "--max-draft-tokens", "6"]
    with ServerProcess(args, log_prefix=None) as server:
        warm_up(server.address, ids)
        [fixed] = validate(
            server.address,
            [p.text for p in prompts],
            ids,
            recordings,
            draft_identity(DEFAULT_DRAFT),
            DEFAULT_DRAFT,
            AcceptancePredictor.beside(resolve_model(DEFAULT_DRAFT)),
            DRAFTS,
            TOKENS,
            0.0,
            features_read(resolve_model(DEFAULT_DRAFT)),
            tmp_path,
            modes=("fixed",),
        )
    assert all(r.answer[: len(a.token_ids)] == a.token_ids for r, a in zip(recordings, fixed.real))  # greedy
    assert fixed.identical == PROMPTS, (fixed.real, fixed.replayed)
    assert sum(a.accepted for a in fixed.real) > 0  # the drafts are real drafts, not empty rounds


@pytest.mark.parametrize("regime, loop", [("modeled", "closed"), ("real", "closed"), ("modeled", "open")])
def test_a_small_sweep_writes_every_figure_for_every_configuration(workload, tmp_path, regime, loop):
    """Closed loop over fleet sizes 1 and 2, or open loop (Poisson arrivals, --rates) at 1 and 2 per second."""
    command = [sys.executable, "-m", "wisp_bench.cli", "run", "--regime", regime, "--engine", "hf"]
    command += ["--limit", str(PROMPTS), "--max-new-tokens", str(TOKENS), "--draft-tokens", str(DRAFTS)]
    if loop == "closed":
        command += ["--sizes", "1", "2", "--sessions-per-device", "1"]
    else:
        command += ["--rates", "1", "2", "--requests", "3"]
    configs = ("wisp", "wisp-paced", "centralized", "vllm-ngram")
    if loop == "open":  # the closed sweeps cover every configuration; open loop is about the arrivals
        configs = ("wisp-paced", "centralized")
    command += ["--output-dir", str(tmp_path), "--configs", *configs]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["regime"].startswith(regime)
    points = {(s["config"], s["load"]) for s in payload["summaries"]}
    assert points == {(c, n) for c in configs for n in (1, 2)}
    for summary in payload["summaries"]:
        assert summary["completed"] == summary["requests"] == (3 if loop == "open" else summary["load"]), summary
        if summary["config"] == "wisp":
            assert summary["tokens_per_round"] >= 1.0 and summary["acceptance_rate"] is not None
        if summary["config"] == "wisp-paced":  # a round a step; drafts verified only where they fit
            assert summary["tokens_per_round"] >= 1.0
    for plot in ("goodput", "slo_attainment", "latency_cdf", "capacity_vs_tpot_slo"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000
    assert regime in (tmp_path / "summary.md").read_text()
    fits = list((tmp_path / "estimator-fits").glob("fit-*.json"))  # one profile, the later servers start from it
    assert len(fits) == (1 if regime == "real" else 0)


def test_real_edge_devices_run_the_draft_on_this_host(tmp_path):
    """`--devices real`, for small fleets: each device runs the shipped draft itself (nothing is recorded or
    replayed), through the same emulated link; its rounds verify real drafts."""
    command = [sys.executable, "-m", "wisp_bench.cli", "run", "--regime", "real", "--engine", "hf"]
    command += ["--devices", "real", "--limit", str(PROMPTS), "--max-new-tokens", str(TOKENS)]
    command += ["--sizes", "1", "--sessions-per-device", "2", "--configs", "wisp"]
    result = subprocess.run([*command, "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "results.json").read_text())
    assert "real edge devices" in payload["regime"] and not (tmp_path / "answers.jsonl").exists()
    wisp = next(s for s in payload["summaries"] if s["config"] == "wisp")
    assert wisp["completed"] == 2 and wisp["acceptance_rate"] > 0 and wisp["tokens_per_round"] > 1.0, wisp


def test_real_edge_devices_refuse_the_modeled_regime_with_a_feature_conditioned_draft(tmp_path, capsys):
    from wisp_bench.cli import main

    assert main(["run", "--regime", "modeled", "--devices", "real", "--output-dir", str(tmp_path)]) == 2
    assert "--devices real needs --regime real" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work
