"""The benchmarks run from a fresh clone as ``python -m benchmarks.<name>`` from the repository root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
EXPECTED = {
    "round_cost",
    "draft_quality",
    "policies",
    "estimator",
    "aiperf_edge",
    "soak",
    "gpu_calibration",
    "follow_up",
    "layer_fusion",
}


def entry_points() -> list[str]:
    """The benchmark modules with a command line: a ``main`` run under ``if __name__ == "__main__"``."""
    return sorted(
        path.stem
        for path in BENCHMARKS.glob("*.py")
        if "def main(" in (text := path.read_text()) and 'if __name__ == "__main__":' in text
    )


def run_module(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_benchmark_is_found():
    assert set(entry_points()) == EXPECTED


@pytest.mark.parametrize("name", entry_points())
def test_help(name):
    result = run_module(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m benchmarks.{name}")
    assert "--target-model" in result.stdout or "--gpu-model" in result.stdout  # the real target, or a modeled one


def test_no_path_edits_and_default_prompts_in_the_repository():
    command = [sys.executable, "-c", "from benchmarks.common import MT_BENCH; print(MT_BENCH)"]
    mt_bench = Path(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip())
    assert mt_bench.is_file() and mt_bench.is_relative_to(ROOT)  # shipped in the repository, with its license
    assert (mt_bench.parent / "LICENSE-mt_bench.txt").is_file()
    for path in BENCHMARKS.glob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and "../shared" not in text and "python benchmarks/" not in text, path


@pytest.mark.slow
def test_estimator_runs_for_real_into_another_results_folder(tmp_path):
    """The cheapest benchmark end to end (the hf engine, a few small batches): its JSON and plot land in
    ``$WISP_BENCH_RESULTS``, not in ``benchmarks/results``."""
    kept = {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob("*")}
    env = {**os.environ, "WISP_BENCH_RESULTS": str(tmp_path / "results")}
    small = ["--backends", "hf", "--batches", "6", "--max-sessions", "2", "--max-prompt-tokens", "64"]
    result = run_module("estimator", *small, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    data = json.loads((tmp_path / "results" / "estimator.json").read_text())
    assert set(data) == {"machine", "args", "results"}
    assert data["args"]["backends"] == ["hf"] and data["args"]["batches"] == 6
    hf = data["results"]["hf"]
    assert {"profile_seconds", "mape", "mape_first_half", "mape_second_half", "coefficients"} <= set(hf)
    assert hf["mape"] >= 0
    assert (tmp_path / "results" / "estimator.png").read_bytes().startswith(b"\x89PNG")
    assert {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob("*")} == kept
