"""Stop conditions on commit, configuration precedence, and generated stubs that match the contract."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from wisp_common.config import ServerConfig, add_config_arguments, config_from_args
from wisp_common.models import cpu_has_bf16, cpu_name
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.request import SamplingParams, StopCondition
from wisp_common.verification import Verification
from wisp_server.session import Session

ROOT = Path(__file__).resolve().parents[1]
EOS = 2


def session(max_new_tokens: int = 10, max_context: int = 100) -> Session:
    return Session("s", 3, [5, 6, 7], SamplingParams(), StopCondition(max_new_tokens, frozenset({EOS})), max_context)


@pytest.mark.parametrize(
    ("drafts", "verification", "limit", "committed", "accepted", "next_token", "reason"),
    [
        ((8, 9), Verification(2, 10), 10, [8, 9, 10], 2, 10, pb.FINISH_REASON_UNSPECIFIED),
        ((8, EOS, 9), Verification(3, 10), 10, [8, EOS], 2, None, pb.FINISH_REASON_STOP),
        ((8, 9), Verification(1, EOS), 10, [8, EOS], 1, EOS, pb.FINISH_REASON_STOP),
        ((8, 9), Verification(2, 10), 2, [8, 9], 2, None, pb.FINISH_REASON_LENGTH),
        ((8, 9), Verification(2, 10), 3, [8, 9, 10], 2, 10, pb.FINISH_REASON_LENGTH),
        ((8, 9, EOS), Verification(3, 10), 3, [8, 9, EOS], 3, None, pb.FINISH_REASON_STOP),
    ],
)
def test_commit_applies_stop_tokens_and_length(drafts, verification, limit, committed, accepted, next_token, reason):
    s = session(max_new_tokens=limit)
    commit = s.commit(drafts, verification)
    assert s.context[3:] == committed
    assert (commit.num_accepted, commit.next_token, commit.finish_reason) == (accepted, next_token, reason)


def test_context_limit_ends_a_session_like_max_new_tokens():
    s = session(max_new_tokens=50, max_context=5)
    commit = s.commit((8, 9, 10), Verification(3, 11))
    assert s.context == [5, 6, 7, 8, 9] and commit.finish_reason == pb.FINISH_REASON_LENGTH


def test_config_precedence_defaults_yaml_env_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ServerConfig)
    yaml_file = tmp_path / "server.yaml"
    yaml_file.write_text("port: 7000\nmax_sessions: 3\nmax_draft_tokens: 5\n")
    args = parser.parse_args(["--config", str(yaml_file), "--max-sessions", "9"])
    config = config_from_args(ServerConfig, args, environ={"WISP_PORT": "7001", "WISP_MAX_SESSIONS": "8"})
    assert (config.port, config.max_sessions, config.max_draft_tokens, config.policy) == (7001, 9, 5, "wisp")
    yaml_file.write_text("prot: 1\n")
    with pytest.raises(SystemExit, match="unknown option"):
        config_from_args(ServerConfig, parser.parse_args(["--config", str(yaml_file)]), environ={})


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni\n", False),  # AVX-512 alone emulates bf16
        ("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16\n", True),
        ("flags\t\t: fpu avx2 amx_bf16 amx_tile amx_int8\n", True),
        ("Features\t: fp asimd sve bf16 i8mm\n", True),  # Arm
        ("Features\t: fp asimd evtstrm crc32\n", False),
    ],
)
def test_dtype_auto_picks_bfloat16_only_where_the_cpu_computes_in_it(cpuinfo, native):
    assert cpu_has_bf16(cpuinfo) is native


XEON = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n"
PI5 = "Features\t: fp asimd evtstrm\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\nModel\t\t: Raspberry Pi 5\n"


@pytest.mark.parametrize(
    "cpuinfo, name",
    [
        ("model name\t: AMD EPYC\nmodel\t\t: 1\nflags\t\t: fpu sse2 avx2 fma\n", "AMD EPYC, 2 cores, avx2"),
        (XEON, "Intel Xeon, 2 cores, avx2 avx512f avx512_bf16 amx_bf16"),
        (PI5, "Raspberry Pi 5 0x41 0xd0b, 2 cores, asimd"),
        ("processor\t: 0\n", "unknown CPU, 2 cores"),
    ],
)
def test_a_cpu_is_named_by_its_model_cores_and_vector_instructions(cpuinfo, name):
    """What labels a figure or a saved estimator fit: two Arm boards, or a pinned and an unpinned server, differ."""
    assert cpu_name(cpuinfo, 2) == name


def test_generated_stubs_match_the_proto(tmp_path):
    """The committed stubs are what grpcio-tools makes of proto/ today (regenerate: make proto)."""
    command = [sys.executable, "-m", "grpc_tools.protoc", "-Iwisp_common/proto=proto"]
    command += [f"--{kind}_out={tmp_path}" for kind in ("python", "pyi", "grpc_python")]
    subprocess.run([*command, "proto/wisp/v1/wisp.proto"], cwd=ROOT, check=True)
    generated = tmp_path / "wisp_common/proto/wisp/v1"
    for name in ("wisp_pb2.py", "wisp_pb2.pyi", "wisp_pb2_grpc.py"):
        committed = ROOT / "wisp_common/proto/wisp/v1" / name
        assert committed.read_text() == (generated / name).read_text(), f"{name} is stale: run `make proto`"
