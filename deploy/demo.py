"""`make demo`: one verification server and two edge devices on this machine.

Starts `wisp-server` with the default target, runs two `wisp-edge generate`
processes against it at the same time, streams their answers line by line,
prints a summary table and shuts everything down. Ctrl-C stops it all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

from wisp_common.config import DEFAULT_DRAFT, DEFAULT_TARGET
from wisp_common.models import resolve_model
from wisp_server.launcher import ServerProcess

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Give three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
]


def run_edge(name: str, prompt: str, address: str, args: argparse.Namespace, summaries: dict) -> subprocess.Popen:
    command = [sys.executable, "-u", "-m", "wisp_edge.cli", "generate", prompt, "--server", address]
    command += ["--draft-model", args.draft_model, "--max-new-tokens", str(args.max_new_tokens)]
    command += ["--device-id", name, "--summary-json", "--threads", "1"]
    if args.draft_tokens:
        command += ["--draft-tokens", str(args.draft_tokens)]
    edge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stream_answer() -> None:
        for line in edge.stdout:
            print(f"[{name}] {line}", end="", flush=True)

    def read_summary() -> None:
        for line in edge.stderr:
            if line.startswith("{"):
                summaries[name] = json.loads(line)
            else:
                print(f"[{name}] {line}", end="", file=sys.stderr, flush=True)

    for target in (stream_answer, read_summary):
        threading.Thread(target=target, daemon=True).start()
    return edge


def print_table(summaries: dict, wall: float) -> None:
    header = f"{'edge':<8} {'tokens':>6} {'rounds':>6} {'accept':>7} {'tok/round':>9} {'tok/s':>6} {'TTFT ms':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, s in sorted(summaries.items()):
        print(
            f"{name:<8} {s['tokens']:>6} {s['rounds']:>6} {s['acceptance_rate']:>7.0%} "
            f"{s['tokens_per_round']:>9.2f} {s['tokens_per_second']:>6.1f} {s['ttft_seconds'] * 1000:>8.0f}"
        )
    total = sum(s["tokens"] for s in summaries.values())
    print(f"all edges: {total} tokens in {wall:.1f} s = {total / wall:.1f} tokens/s committed\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-model", default=DEFAULT_TARGET)
    parser.add_argument("--draft-model", default=DEFAULT_DRAFT)
    parser.add_argument("--edges", type=int, default=2, help="edge processes to run at once")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, help="most drafts per round (default: wisp-edge's)")
    args = parser.parse_args()

    print(f"preparing models {args.target_model} and {args.draft_model} (built once, then cached)", flush=True)
    resolve_model(args.target_model)
    resolve_model(args.draft_model)
    server = ServerProcess(["--target-model", args.target_model], log_prefix=None)
    print(f"server ready at {server.address}; starting {args.edges} edges\n", flush=True)
    edges: list[subprocess.Popen] = []
    try:
        summaries: dict = {}
        started = time.monotonic()
        for i in range(args.edges):
            edges.append(run_edge(f"edge-{i + 1}", PROMPTS[i % len(PROMPTS)], server.address, args, summaries))
        failed = [edge.args[4] for edge in edges if edge.wait() != 0]
        time.sleep(0.2)  # let the reader threads print the last lines
        print_table(summaries, time.monotonic() - started)
        if failed:
            print(f"{len(failed)} edge(s) failed", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping edges and server", file=sys.stderr)
        return 130
    finally:
        for edge in edges:
            if edge.poll() is None:
                edge.terminate()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
