"""AIPerf against `wisp-edge serve`: a tool built for vLLM profiles the edge daemon unchanged.

Starts a verification server and an edge daemon on loopback, runs NVIDIA's
AIPerf (installed from PyPI into its own venv: its pins clash with vLLM's)
for a short streamed chat run, and reports what AIPerf measured, its
speculative decoding figures included: it reads them from each answer's
``metrics.speculative_decoding``, the shape vLLM writes with
``--per-request-spec-decode-metrics``. AIPerf's own files are kept under
``<results>/aiperf/``.

    python3 -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf
    python -m benchmarks.aiperf_edge --aiperf /tmp/aiperf/bin/aiperf
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from benchmarks.common import add_common_options
from benchmarks.report import print_table, results_dir, save_plot, write_json
from wisp_common.models import resolve_model
from wisp_server.launcher import ServerProcess

# AIPerf's record names for what a user reads first, and their unit
REPORTED = {
    "time_to_first_token": "ms",
    "inter_token_latency": "ms",
    "request_latency": "ms",
    "output_token_throughput": "tokens/s",
    "request_count": "",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"wisp-edge serve exited with {process.returncode}")
        try:
            if urlopen(f"{url}/health", timeout=5).status == 200:
                return
        except (URLError, ConnectionError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"wisp-edge serve did not answer {url}/health in {timeout:g}s")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aiperf_edge", description=__doc__.splitlines()[0])
    add_common_options(parser, draft_model=True, dtype="float32")
    parser.add_argument("--aiperf", default="aiperf", help="the aiperf executable (its own venv)")
    parser.add_argument("--requests", type=int, default=12, help="requests AIPerf sends")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    parser.add_argument("--input-tokens", type=int, default=64, help="synthetic prompt length, mean")
    parser.add_argument("--output-tokens", type=int, default=48, help="answer length, mean")
    args = parser.parse_args()
    aiperf = shutil.which(args.aiperf)
    if aiperf is None:
        raise SystemExit(f"{args.aiperf}: not found; install AIPerf in a venv of its own (see --help)")

    artifacts = results_dir() / "aiperf"
    shutil.rmtree(artifacts, ignore_errors=True)
    server_args = ["--target-model", args.target_model, "--dtype", args.dtype]
    with ServerProcess(server_args, log_prefix=None) as server:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        edge = subprocess.Popen(
            [sys.executable, "-m", "wisp_edge.cli", "serve", "--server", server.address, "--port", str(port),
             "--draft-model", args.draft_model, "--max-concurrent-requests", str(args.concurrency)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_healthy(url, edge)
            model = json.loads(urlopen(f"{url}/v1/models", timeout=10).read())["data"][0]["id"]
            command = [
                aiperf, "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
                "--tokenizer", resolve_model(args.draft_model), "--request-count", str(args.requests),
                "--concurrency", str(args.concurrency), "--prompt-input-tokens-mean", str(args.input_tokens),
                "--prompt-input-tokens-stddev", "0", "--prompt-output-tokens-mean", str(args.output_tokens),
                "--prompt-output-tokens-stddev", "0", "--output-artifact-dir", str(artifacts), "--ui-type", "none",
                "--random-seed", "0",
            ]  # fmt: skip
            run = subprocess.run(command, capture_output=True, text=True)
        finally:
            edge.terminate()
            edge.wait(timeout=60)
    (artifacts / "aiperf.log").parent.mkdir(parents=True, exist_ok=True)
    (artifacts / "aiperf.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise SystemExit(f"aiperf failed ({run.returncode}); its output: {artifacts / 'aiperf.log'}")
    export = next(artifacts.rglob("profile_export_aiperf.json"), None)
    if export is None:
        raise SystemExit(f"aiperf wrote no profile_export_aiperf.json under {artifacts}")
    records = json.loads(export.read_text())
    spec = {k: v for k, v in records.items() if "spec_decode" in k or "acceptance" in k}
    if not spec:
        raise SystemExit(f"AIPerf reported no speculative decoding figures: see {export}")

    units = {**REPORTED, **dict.fromkeys(spec, "")}
    rows = [
        [name, unit, _stat(records.get(name), "avg"), _stat(records.get(name), "p50")] for name, unit in units.items()
    ]
    print_table(["AIPerf figure", "unit", "avg", "p50"], rows)
    png = plot(spec)
    path = write_json("aiperf_edge", {"args": vars(args), "aiperf_command": command[1:], "figures": records})
    print(f"wrote {path} and {png}; AIPerf's own files in {artifacts}")
    return 0


def _stat(value, key: str):
    if isinstance(value, dict):
        return value.get(key, "")
    return "" if value is None else value


def plot(spec: dict) -> Path:
    """AIPerf's pooled acceptance histogram: rounds by the number of drafts accepted."""
    histogram = next((v for k, v in spec.items() if "histogram" in k and isinstance(v, dict)), None)

    def draw(ax) -> None:
        if histogram:
            counts = {int(k): v for k, v in histogram.items() if str(k).isdigit()}
            ax.bar(list(counts), list(counts.values()))
        ax.set(title="AIPerf: drafts accepted per round (wisp-edge serve)", xlabel="drafts accepted", ylabel="rounds")

    return save_plot("aiperf_edge", draw)


if __name__ == "__main__":
    sys.exit(main())
