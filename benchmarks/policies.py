"""WISP, SLED, FCFS and centralized serving side by side on one workload, with one SLO.

Configurations (each a fresh server; the edges run the same code, configured differently):

* `wisp`: server policy wisp; edges with the speculation controller and pipelined drafting;
* `sled`: server policy sled (static batches: full, or a time window); edges draft a fixed length;
* `fcfs`: server policy fcfs; edges draft a fixed length;
* `centralized`: the server's Generate RPC: the target alone, vLLM continuous batching.

N emulated devices, each its own process with its own copy of the draft
(started once, reused by every turn), answer MT-Bench first turns from a
shared queue until it is empty. With ``--pin`` (default) the devices share
core 0 and the server has core 1, so drafting and verification do not fight
over a core (real devices bring their own processors; here 8 of them share
one, which slows drafting and so favours `centralized`).

A request meets its SLO when its TTFT and its TPOT (time per output token
after the first) are both within target. Goodput: output tokens of the
requests that met their SLO, per second of the run. The configurations take
turns in alternating order ``--repeats`` times; figures are medians over the
turns. The overhead per round (gRPC, scheduling, bookkeeping: everything but
the forward pass and the wait for a batch) comes from the devices' round
trips (sent to verdict's arrival) and the server's Prometheus metrics. The
server's own part of it is shown apart: scheduling and bookkeeping from its
metrics, and gRPC's cost measured on the idle server before each turn (the
rest is the devices' side: eight of them saturate their shared core).

    python -m benchmarks.policies                        # 8 devices, 32 prompts, 2 turns
    python -m benchmarks.policies --devices 4 --prompts 16 --repeats 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import add_common_options
from benchmarks.report import print_table, save_plot, write_json
from wisp_bench.server_metrics import scrape

CONFIGS = ("wisp", "sled", "fcfs", "centralized")


@dataclass
class Request:
    tokens: int
    ttft: float
    tpot: float
    wall: float
    stats: dict | None = None  # the edge's GenerationStats summary (speculative configurations)


def grpc_floor(address: str, calls: int = 200) -> float:
    """gRPC's own cost of a message exchange on this host: the median unary call to an idle server, in seconds.

    A unary call also sets up and ends a call, which a message on an open Speculate stream does not:
    this overstates gRPC's part of a round, never understates it.
    """
    import grpc

    from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
    from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.WispStub(channel)
        times = []
        for _ in range(calls + 20):  # the first 20 warm the channel up
            started = time.perf_counter()
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            times.append(time.perf_counter() - started)
    return statistics.median(times[20:])


def device_process(args, index: int, jobs, work, results) -> None:
    """One emulated edge device: its own process (no shared interpreter), its draft loaded once for every turn.

    A job is a (configuration, server address) pair; the device answers prompts from the shared ``work``
    queue until it meets a ``None``. It reports ``(index, kind, payload)`` to ``results``: "ready" once
    loaded, a "request" per answer, "done" after each job, or an "error".
    """
    try:
        _device(args, index, jobs, work, results)
    except Exception as error:  # the parent must hear of it, not wait for a device that is gone
        results.put((index, "error", repr(error)))


def _device(args, index: int, jobs, work, results) -> None:
    import grpc
    import torch

    from wisp_common.config import EdgeConfig
    from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
    from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
    from wisp_common.request import Slo
    from wisp_edge.client import EdgeClient
    from wisp_edge.controller import AcceptancePredictor, AdaptiveSpeculation, FixedLength
    from wisp_edge.draft_loader import drafter_factory
    from wisp_edge.lookup import PromptLookup

    if args.pin:
        os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    make_drafter = drafter_factory(args.draft_model, lookup=PromptLookup.of(EdgeConfig()))  # as every policy's edge
    identity = pb.ModelIdentity(name=args.draft_model, tokenizer_fingerprint=args.fingerprint)
    slo = Slo(args.slo_ttft, args.slo_tpot)
    results.put((index, "ready", None))
    while (job := jobs.get()) is not None:
        config, address = job
        with grpc.insecure_channel(address) as channel:
            stub, client = pb_grpc.WispStub(channel), None
            if config != "centralized":
                if config == "wisp":
                    speculation = AdaptiveSpeculation.mode_with(AcceptancePredictor.beside(args.draft_path))
                else:
                    speculation = FixedLength
                client = EdgeClient(
                    channel, make_drafter(), identity, speculation=speculation, pipeline=config == "wisp"
                )
            while (prompt := work.get()) is not None:
                if client is None:
                    results.put((index, "request", vars(centralized(args, stub, prompt))))
                    continue
                result = client.generate(
                    prompt, max_new_tokens=args.answer_tokens, draft_tokens=args.draft_tokens, slo=slo
                )
                st = result.stats
                tpot = (st.wall_seconds - st.ttft_seconds) / max(st.generated - 1, 1)
                request = Request(st.generated, st.ttft_seconds, tpot, st.wall_seconds, st.summary())
                results.put((index, "request", vars(request)))  # a dict: __main__ differs between processes
        results.put((index, "done", None))


def centralized(args, stub, prompt: list[int]) -> Request:
    from wisp_common.proto.wisp.v1 import wisp_pb2 as pb

    started, first, count = time.monotonic(), None, 0
    request = pb.GenerateRequest(prompt_token_ids=prompt, stop=pb.StopCondition(max_new_tokens=args.answer_tokens))
    for response in stub.Generate(request, timeout=600):
        count += len(response.token_ids)
        first = first or time.monotonic()
    end = time.monotonic()
    return Request(count, first - started, (end - first) / max(count - 1, 1), end - started)


class Devices:
    """The emulated devices, started once and given one job per turn."""

    def __init__(self, args):
        context = multiprocessing.get_context("spawn")
        self.work, self.results = context.Queue(), context.Queue()
        self.jobs = [context.Queue() for _ in range(args.devices)]
        self.processes = [
            context.Process(target=device_process, args=(args, i, self.jobs[i], self.work, self.results), daemon=True)
            for i in range(args.devices)
        ]
        for process in self.processes:
            process.start()
        for _ in self.processes:
            self._get()  # "ready"

    def _get(self) -> tuple[str, dict | None]:
        index, kind, payload = self.results.get(timeout=900)
        if kind == "error":
            raise RuntimeError(f"device {index} failed: {payload}")
        return kind, payload

    def run(self, config: str, address: str, prompts: list[list[int]]) -> list[Request]:
        for prompt in prompts:
            self.work.put(prompt)
        for jobs in self.jobs:
            self.work.put(None)
            jobs.put((config, address))
        done, finished = [], 0
        while finished < len(self.jobs):
            kind, request = self._get()  # request: a Request's fields
            if kind == "done":
                finished += 1
            else:
                done.append(Request(**request))
        return done

    def close(self) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        for process in self.processes:
            process.join(timeout=30)


def measure(args, config: str, prompts, devices: Devices) -> dict:
    from wisp_server.launcher import ServerProcess

    policy = "fcfs" if config == "centralized" else config
    server_args = ["--target-model", args.target_model, "--engine", "vllm", "--dtype", args.dtype]
    server_args += ["--policy", policy, "--max-sessions", str(args.devices + 4), "--max-draft-tokens", "8"]
    env, cpus = ({"VLLM_CPU_OMP_THREADS_BIND": "1"}, {1}) if args.pin else ({}, None)
    with ServerProcess(server_args, log_prefix=None, env=env, cpus=cpus) as server:
        grpc_seconds = grpc_floor(server.address)
        before = scrape(server.metrics_port)
        started = time.monotonic()
        requests = devices.run(config, server.address, prompts)
        wall = time.monotonic() - started
        after = scrape(server.metrics_port)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    met = [r for r in requests if r.ttft <= args.slo_ttft and r.tpot <= args.slo_tpot]
    result = {
        "requests": len(requests),
        "wall_seconds": wall,
        "throughput": sum(r.tokens for r in requests) / wall,
        "goodput": sum(r.tokens for r in met) / wall,
        "slo_attainment": len(met) / len(requests),
        "mean_ttft": statistics.mean(r.ttft for r in requests),
        "mean_tpot": statistics.mean(r.tpot for r in requests),
        "rounds": delta.get("wisp_rounds_total", 0.0),
        "batches": delta.get("wisp_verify_seconds_count", 0.0),
        "mean_batch_size": delta.get("wisp_batch_size_sum", 0.0) / max(delta.get("wisp_batch_size_count", 0.0), 1),
        "verify_seconds": delta.get("wisp_verify_seconds_sum", 0.0),
        "schedule_seconds": delta.get("wisp_schedule_seconds_sum", 0.0),
        "bookkeeping_seconds": delta.get("wisp_round_overhead_seconds_sum", 0.0),
        "grpc_ms": 1000 * grpc_seconds,
    }
    edges = [r.stats for r in requests if r.stats]
    if edges:
        total = {k: sum(e[k] for e in edges) for k in ("drafted", "sent", "accepted", "tokens", "rounds")}
        seconds = {k: sum(e[k] for e in edges) for k in ("round_trip_seconds", "idle_seconds", "wall_seconds")}
        waited = sum(e["server_queue_seconds"] + e["server_verify_seconds"] for e in edges)
        rounds = max(total["rounds"], 1)
        # A round's trip is: waiting for its batch (the policy's choice included), the batch's forward pass,
        # and the rest: gRPC, the service's bookkeeping. The policy's time is added back from the metrics.
        scheduling = result["schedule_seconds"] * result["mean_batch_size"]
        overhead = seconds["round_trip_seconds"] - waited + scheduling
        server_own = scheduling + result["bookkeeping_seconds"] + rounds * grpc_seconds
        result.update(
            acceptance=total["accepted"] / max(total["sent"], 1),
            tokens_per_round=total["tokens"] / rounds,
            wasted_draft_share=(total["drafted"] - total["accepted"]) / max(total["drafted"], 1),
            edge_idle_share=seconds["idle_seconds"] / seconds["wall_seconds"],
            round_trip_ms=1000 * seconds["round_trip_seconds"] / rounds,
            scheduling_ms_per_round=1000 * scheduling / rounds,
            bookkeeping_ms_per_round=1000 * result["bookkeeping_seconds"] / rounds,
            overhead_ms_per_round=1000 * overhead / rounds,
            overhead_share=overhead / seconds["round_trip_seconds"],
            server_overhead_ms_per_round=1000 * server_own / rounds,
            server_overhead_share=server_own / seconds["round_trip_seconds"],
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.policies", description=__doc__.splitlines()[0])
    add_common_options(
        parser,
        draft_model=True,
        dtype_help="the target's dtype in the server (auto: bfloat16 where the CPU computes in it)",
        prompts_flag="--prompts-file",
        answer_tokens=True,
        repeats=True,
    )
    parser.add_argument("--prompts", type=int, default=32, help="requests per configuration")
    parser.add_argument("--devices", type=int, default=8, help="emulated devices, concurrent sessions")
    parser.add_argument("--draft-tokens", type=int, default=4, help="fixed length (sled, fcfs); the most for wisp")
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-tpot", type=float, default=0.1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument(
        "--pin", action=argparse.BooleanOptionalAction, default=True, help="devices core 0, server core 1"
    )
    args = parser.parse_args()

    from wisp_common.models import load_tokenizer, resolve_model, tokenizer_fingerprint
    from wisp_common.prompts import encode_prompt, load_prompts

    tokenizer = load_tokenizer(args.target_model)
    prompts = [encode_prompt(tokenizer, p, chat=True) for p in load_prompts(args.prompts_file)][: args.prompts]
    args.draft_path = resolve_model(args.draft_model)
    args.fingerprint = tokenizer_fingerprint(load_tokenizer(args.draft_path))  # loaded once, not in every device
    if args.pin:
        os.sched_setaffinity(0, {0})

    print(f"starting {args.devices} device processes ...", file=sys.stderr, flush=True)
    devices = Devices(args)
    turns: dict[str, list[dict]] = {c: [] for c in args.configs}
    try:
        for repeat in range(args.repeats):
            for config in args.configs if repeat % 2 == 0 else list(reversed(args.configs)):
                print(f"turn {repeat + 1}/{args.repeats}: {config} ...", file=sys.stderr, flush=True)
                turns[config].append(measure(args, config, prompts, devices))
                m = turns[config][-1]
                print(f"  goodput {m['goodput']:.1f} tok/s, SLO {m['slo_attainment']:.0%}", file=sys.stderr, flush=True)
    finally:
        devices.close()
    results = {c: {k: statistics.median(t[k] for t in runs) for k in runs[0]} for c, runs in turns.items()}

    base = results.get("centralized", {}).get("goodput") or None
    rows = []
    for config, r in results.items():
        rows.append(
            [
                config,
                round(r["goodput"], 1),
                round(r["goodput"] / base, 2) if base else "-",
                f"{r['slo_attainment']:.0%}",
                round(1000 * r["mean_ttft"]),
                round(1000 * r["mean_tpot"], 1),
                f"{r['acceptance']:.0%}" if "acceptance" in r else "-",
                round(r.get("tokens_per_round", 1.0), 2),
                f"{r['wasted_draft_share']:.0%}" if "wasted_draft_share" in r else "-",
                f"{r['edge_idle_share']:.0%}" if "edge_idle_share" in r else "-",
                f"{r['overhead_ms_per_round']:.2f} ({r['overhead_share']:.1%})" if "overhead_share" in r else "-",
                f"{r['server_overhead_ms_per_round']:.2f} ({r['server_overhead_share']:.1%})"
                if "server_overhead_share" in r
                else "-",
            ]
        )
    headers = ["config", "goodput", "vs central", "SLO met", "TTFT ms", "TPOT ms", "accept", "tok/round"]
    print_table([*headers, "wasted", "edge idle", "overhead ms/round (share)", "of which server's own"], rows)
    for config, r in results.items():
        if "server_overhead_share" in r:
            print(
                f"{config}: the server's own overhead per round = gRPC {r['grpc_ms']:.2f} ms (an idle unary call)"
                f" + scheduling {r['scheduling_ms_per_round']:.2f}"
                f" + bookkeeping {r['bookkeeping_ms_per_round']:.2f} ms, "
                f"{r['server_overhead_share']:.1%} of a {r['round_trip_ms']:.0f} ms round trip"
            )
    path = write_json("policies", {"args": {k: v for k, v in vars(args).items()}, "median": results, "turns": turns})
    png = plot(results, args)
    print(f"wrote {path} and {png}")
    return 0


def plot(results: dict, args) -> Path:
    def draw(left, right) -> None:
        names = list(results)
        left.bar(names, [results[n]["goodput"] for n in names], color="tab:blue")
        left.set(title=f"goodput, {args.devices} devices", ylabel="tokens/s within SLO")
        right.bar(names, [100 * results[n]["slo_attainment"] for n in names], color="tab:green")
        right.set(title=f"SLO attainment (TTFT {args.slo_ttft}s, TPOT {args.slo_tpot}s)", ylabel="% of requests")

    return save_plot("policies", draw, ncols=2, figsize=(10, 4))


if __name__ == "__main__":
    sys.exit(main())
