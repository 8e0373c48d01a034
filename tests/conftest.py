"""Fixtures: the real SmolLM2 tokenizer, tiny random models that share it, and a live server."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import perturbed, running_server, save_with_tokenizer, tiny_llama  # noqa: E402

from wisp_common.models import load_tokenizer, tokenizer_fingerprint  # noqa: E402
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb  # noqa: E402
from wisp_edge.client import EdgeClient  # noqa: E402
from wisp_edge.drafter import ModelDrafter  # noqa: E402

SMOLLM2_VOCAB = 49152


def pytest_collection_modifyitems(config, items):
    """GPU tests (`pytest -m gpu`) are deselected, not skipped, where no CUDA device exists."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(scope="session", autouse=True)
def estimator_fits(tmp_path_factory):
    """Server processes the tests start keep their estimator's fit in one directory of this run's (each profiles
    once per engine and target, and the rest start from its fit), never in the user's cache."""
    directory = tmp_path_factory.mktemp("estimator")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WISP_ESTIMATOR_CACHE", str(directory))
        yield directory


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, smollm2_tokenizer):
    """A tiny random target and a draft close to it, both with the SmolLM2 tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    target = tiny_llama(SMOLLM2_VOCAB, layers=2, seed=0)
    draft = perturbed(target, 0.05, seed=1)
    return (
        save_with_tokenizer(target, smollm2_tokenizer, root / "target"),
        save_with_tokenizer(draft, smollm2_tokenizer, root / "draft"),
    )


@pytest.fixture(scope="module")
def tiny_server(tiny_pair):
    with running_server(tiny_pair[0], engine="hf", metrics_port=0) as server:
        yield server, f"127.0.0.1:{server.port}"


def make_client(address: str, draft_dir: str, tokenizer, **options) -> EdgeClient:
    from wisp_common.models import load_causal_lm

    identity = pb.ModelIdentity(
        name=draft_dir, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=SMOLLM2_VOCAB
    )
    drafter = ModelDrafter(load_causal_lm(draft_dir))
    return EdgeClient(grpc.insecure_channel(address), drafter, identity, **options)
