"""Shared by the fault and resume tests: server and edge processes with the tiny pair, metrics, pacing."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from wisp_bench.server_metrics import scrape
from wisp_common.config import EdgeConfig
from wisp_common.models import load_causal_lm, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_edge.client import EdgeClient, GenerationResult, ResumePolicy
from wisp_edge.connection import connect
from wisp_edge.drafter import ModelDrafter
from wisp_server.launcher import ServerProcess

PROMPT = [1, 504, 3458, 282, 4649, 314, 5465, 47]
TESTS = Path(__file__).parent
# Patient enough for a server process to come back (up to a minute or two on these shared cores), quick to notice
# a hang.
PATIENT = ResumePolicy(round_timeout=3.0, max_retries=150, backoff=0.2, backoff_max=1.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_server_args(target: str, port: int = 0, *extra: str) -> list[str]:
    return [
        "--target-model", target, "--engine", "hf", "--device", "cpu", "--dtype", "float32",
        "--no-profile-estimator", "--threads", "1", "--max-context-tokens", "4096", "--port", str(port), *extra,
    ]  # fmt: skip


def tiny_server(target: str, port: int = 0, *extra: str, **options) -> ServerProcess:
    return ServerProcess(tiny_server_args(target, port, *extra), log_prefix=None, **options)


def metrics(server: ServerProcess) -> dict[str, float]:
    """The server's metrics over HTTP, by sample name (labels summed)."""
    return scrape(server.metrics_port)


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.02) -> float:
    """Seconds until ``condition`` held; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout}s"
        time.sleep(step)
    return time.monotonic() - started


def edge_client(server: str, draft_dir: str, tokenizer, resume: ResumePolicy = PATIENT) -> EdgeClient:
    """A real edge client on the edge's own channel (keepalive; several servers: comma-separated)."""
    identity = pb.ModelIdentity(
        name=draft_dir, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer)
    )
    channel = connect(EdgeConfig(server=server))
    return EdgeClient(channel, ModelDrafter(load_causal_lm(draft_dir)), identity, resume=resume)


def edge_process(address: str, draft_dir: str, output: Path, max_new_tokens: int, *extra: str) -> subprocess.Popen:
    """`wisp-edge generate` on the tiny draft, greedy, writing its answer as JSONL to ``output``."""
    command = [
        sys.executable, "-m", "wisp_edge.cli", "generate", "The tiny model rambles on", "--server", address,
        "--draft-model", draft_dir, "--no-chat", "--ignore-eos", "--max-new-tokens", str(max_new_tokens),
        "--speculation", "fixed", "--draft-tokens", "3", "--threads", "1", "--output", str(output), *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


class Paced:
    """A generation in a thread whose edge takes ``pace`` seconds per commit; ``reached`` is set once it has
    committed ``after`` tokens, so a test can break something mid-generation."""

    def __init__(self, client: EdgeClient, after: int, pace: float = 0.01, **generate):
        self.reached = threading.Event()
        self.streamed: list[int] = []
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self._after, self._pace = after, pace
        self._thread = threading.Thread(target=self._run, args=(client, generate), daemon=True)
        self._thread.start()

    def _on_tokens(self, tokens: list[int]) -> None:
        self.streamed += tokens
        if len(self.streamed) >= self._after:
            self.reached.set()
        time.sleep(self._pace)

    def _run(self, client: EdgeClient, generate: dict) -> None:
        try:
            self.result = client.generate(PROMPT, on_tokens=self._on_tokens, **generate)
        except BaseException as error:  # the test thread re-raises it
            self.error = error
        finally:
            self.reached.set()

    def wait_reached(self, timeout: float = 120) -> None:
        assert self.reached.wait(timeout), "the generation never got going"
        assert self.result is None and self.error is None, "it ended before the fault"

    def join(self, timeout: float = 300) -> GenerationResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the generation hung"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        assert self.streamed == self.result.token_ids  # every committed token streamed once: none twice, none lost
        return self.result

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
