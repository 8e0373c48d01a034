"""A draft carries what the edge needs and says which target weights it was trained for.

The edge never reads the target's checkpoint (a Jetson cannot hold a 32B
model to read a few rows of it), and the server refuses a draft trained for
other weights of the same tokenizer, whose acceptance would silently collapse.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from helpers import perturbed, running_server, save_with_tokenizer, tiny_llama

from wisp_common import device_kind
from wisp_common.eagle import load_eagle_model, trained_for
from wisp_common.identity import draft_identity
from wisp_common.models import PACKAGED_DRAFTS, resolve_model, target_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc

SHIPPED = PACKAGED_DRAFTS / "smollm2-135m-wisp-draft"
VOCAB = 49152


def test_the_shipped_draft_loads_on_a_machine_that_never_saw_the_target(tmp_path):
    """Empty model caches, no hub: loading and drafting touch only the draft's own files."""
    script = (
        "import torch, os\n"
        "from wisp_common.eagle import load_eagle_model\n"
        f"model = load_eagle_model({str(SHIPPED)!r})\n"
        "features, tokens = torch.zeros(1, 3, 576), torch.tensor([[1, 2, 3]])\n"
        "print(model(features, tokens)[1].shape[-1], sorted(os.listdir(os.environ['WISP_CACHE_DIR'])))\n"
    )
    env = dict(
        os.environ,
        WISP_CACHE_DIR=str(tmp_path / "cache"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        HOME=str(tmp_path),
    )
    (tmp_path / "cache").mkdir()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    head_rows = len(load_eagle_model(SHIPPED).head_ids)
    assert out.stdout.split() == [str(head_rows), "[]"]  # drafted, and built nothing in the cache


def test_the_shipped_draft_records_the_default_targets_weights():
    recorded = json.loads((SHIPPED / "config.json").read_text())["target_fingerprint"]
    assert recorded == trained_for(SHIPPED) == target_fingerprint(resolve_model("smollm2-135m-instruct"))
    assert len(recorded) == 16


def test_target_fingerprint_tells_a_fine_tune_apart_but_not_a_dtype_copy(tmp_path, smollm2_tokenizer):
    base = tiny_llama(VOCAB, layers=2, seed=0)
    base_dir = save_with_tokenizer(base, smollm2_tokenizer, tmp_path / "base")
    half_dir = save_with_tokenizer(base.to(torch.bfloat16), smollm2_tokenizer, tmp_path / "bf16")
    tuned_dir = save_with_tokenizer(
        perturbed(tiny_llama(VOCAB, seed=0), 0.01, seed=3), smollm2_tokenizer, tmp_path / "t"
    )
    assert target_fingerprint(base_dir) == target_fingerprint(half_dir)
    assert target_fingerprint(base_dir) != target_fingerprint(tuned_dir)
    assert target_fingerprint(tmp_path / "no-such-checkpoint") == ""


def _open(address: str, identity: pb.ModelIdentity) -> list[pb.SpeculateResponse]:
    request = pb.SpeculateRequest(
        open=pb.OpenSession(
            draft_model=identity, prompt_token_ids=[1, 504, 3458], stop=pb.StopCondition(max_new_tokens=2)
        )
    )
    stub = pb_grpc.WispStub(grpc.insecure_channel(address))
    return list(stub.Speculate(iter([request]), timeout=60))


@pytest.mark.parametrize("check", ["refuse", "warn"])
def test_the_server_refuses_or_warns_on_a_draft_for_other_weights(tiny_pair, smollm2_tokenizer, check, caplog):
    ours = draft_identity(tiny_pair[1], smollm2_tokenizer)
    assert ours.target_fingerprint == ""  # a plain small model reads no features: nothing to check
    with running_server(tiny_pair[0], engine="hf", draft_check=check) as server:
        address = f"127.0.0.1:{server.port}"
        target = pb_grpc.WispStub(grpc.insecure_channel(address)).GetServerInfo(pb.GetServerInfoRequest())
        assert target.target_model.target_fingerprint == target_fingerprint(tiny_pair[0])
        assert _open(address, ours)[0].WhichOneof("kind") == "opened"
        matching = pb.ModelIdentity(**{**_fields(ours), "target_fingerprint": target.target_model.target_fingerprint})
        assert _open(address, matching)[0].WhichOneof("kind") == "opened"

        other = pb.ModelIdentity(**{**_fields(ours), "target_fingerprint": "0123456789abcdef"})
        with caplog.at_level(logging.WARNING, logger="wisp_server.service"):
            if check == "refuse":
                with pytest.raises(grpc.RpcError) as refused:
                    _open(address, other)
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "0123456789abcdef" in refused.value.details() and "wisp-distill" in refused.value.details()
            else:
                assert _open(address, other)[0].WhichOneof("kind") == "opened"
                assert "0123456789abcdef" in caplog.text


def _fields(identity: pb.ModelIdentity) -> dict:
    return {f.name: v for f, v in identity.ListFields()}


@pytest.mark.parametrize(
    ("tree_model", "tegra", "kind"),
    [
        ("NVIDIA Jetson Orin Nano Developer Kit\x00", False, "jetson-orin-nano"),
        ("NVIDIA Jetson AGX Orin\x00", True, "jetson"),
        ("Raspberry Pi 5 Model B Rev 1.0\x00", False, "raspberry-pi-5"),
        ("Raspberry Pi 4 Model B Rev 1.4\x00", False, "raspberry-pi"),
        (None, False, "laptop"),
    ],
)
def test_device_kind_is_detected_from_the_boards_files(tmp_path: Path, tree_model, tegra, kind):
    model, release = tmp_path / "model", tmp_path / "nv_tegra_release"
    if tree_model is not None:
        model.write_text(tree_model)
    if tegra:
        release.write_text("# R36 (release), REVISION: 4.0\n")
    assert device_kind.detect(release, model) == kind
    assert device_kind.label_of(kind) == kind


def test_unknown_device_kinds_are_labelled_other():
    assert device_kind.label_of("my-toaster") == device_kind.OTHER
    assert device_kind.label_of("laptop") == "laptop"
