"""Follow-up turns: a conversation's second turn against its first, with and without reusing its history.

MT-Bench's two-turn questions through a real server (vLLM engine, prefix
caching on) and the edge as shipped (the default feature-conditioned draft).
Each conversation's first turn is answered; its second turn (the first
question, the answer, the second question) is then asked twice, side by side:

* ``reuse``: by the client that answered the first turn, which kept the
  target features of that history and tells the server so, so vLLM's prefix
  cache serves the history's KV;
* ``recompute``: by a client that forgot the history (as every client did
  before follow-up turns were cheap): the server computes it again.

The order of the two alternates from one conversation to the next. Reported:
time to first token (TTFT, the edge's, from the call to the first committed
token), the server's prefix cache hits (``wisp_prefix_cache_hits_total``), and
tokens per second of the second turn's answer.

    python -m benchmarks.follow_up --conversations 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.request import urlopen

from benchmarks.common import add_common_options
from benchmarks.report import print_table, save_plot, write_json
from wisp_server.launcher import ServerProcess

MODES = ("reuse", "recompute")


def prefix_cache_hits(metrics_port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return next(s.value for s in samples if s.name == "wisp_prefix_cache_hits_total")


def timed(client, prompt_ids: list[int], max_new_tokens: int) -> tuple[float, float, list[int]]:
    """(TTFT, whole turn's seconds, answer) of one generation."""
    started, first = time.monotonic(), []

    def on_tokens(tokens: list[int]) -> None:
        if not first:
            first.append(time.monotonic() - started)

    result = client.generate(prompt_ids, max_new_tokens=max_new_tokens, on_tokens=on_tokens)
    return first[0], time.monotonic() - started, result.token_ids


def conversations(path: str, limit: int) -> list[tuple[int, list[str]]]:
    """(question id, first two turns) of the records with two turns or more (MT-Bench's and Spec-Bench's shape)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    found = [(r.get("question_id", i), r["turns"][:2]) for i, r in enumerate(records) if len(r.get("turns", ())) >= 2]
    if not found:
        raise SystemExit(f"{path}: no two-turn conversations (records with 'turns', as MT-Bench's)")
    return found[:limit]


def run(args, server: ServerProcess) -> list[dict]:
    from wisp_common.config import EdgeConfig
    from wisp_edge.chat import conversation_ids
    from wisp_edge.cli import build_clients

    (holder, forgetful), tokenizer = build_clients(EdgeConfig(server=server.address, draft_model=args.draft_model), 2)
    questions = conversations(args.prompts_file, args.conversations)
    rows = []
    for index, (question_id, turns) in enumerate(questions):
        first = [{"role": "user", "content": turns[0]}]
        first_ids = conversation_ids(tokenizer, first)
        ttft_first, _, answer = timed(holder, first_ids, args.answer_tokens)
        reply = tokenizer.decode(answer, skip_special_tokens=True)
        second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": turns[1]}]
        second_ids = conversation_ids(tokenizer, second)
        row = {"question_id": question_id, "turn1_prompt_tokens": len(first_ids), "turn1_ttft": ttft_first}
        row["turn2_prompt_tokens"] = len(second_ids)
        answers = {}
        for mode in MODES if index % 2 == 0 else reversed(MODES):
            client = holder if mode == "reuse" else forgetful
            if mode == "recompute":
                client.drafter.start([])  # forgets any history, as a client without per-conversation state
            row[f"{mode}_known_features"] = client.drafter.known_features if mode == "reuse" else 0
            hits = prefix_cache_hits(server.metrics_port)
            ttft, seconds, answers[mode] = timed(client, second_ids, args.answer_tokens)
            row[f"{mode}_ttft"] = ttft
            row[f"{mode}_tokens_per_second"] = len(answers[mode]) / seconds
            row[f"{mode}_prefix_cache_hits"] = prefix_cache_hits(server.metrics_port) - hits
        if answers["reuse"] != answers["recompute"]:
            raise SystemExit(f"question {question_id}: the two answers differ; speculation must be lossless")
        rows.append(row)
        print(
            f"  [{index + 1}/{len(questions)}] turn 2 of {len(second_ids)} tokens: TTFT reuse "
            f"{row['reuse_ttft'] * 1000:.0f} ms, recompute {row['recompute_ttft'] * 1000:.0f} ms",
            file=sys.stderr,
        )
    return rows


def summary(rows: list[dict]) -> dict:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    result = {key: median(key) for key in rows[0] if key != "question_id"}
    result["turn2_ttft_ratio"] = statistics.median(r["reuse_ttft"] / r["recompute_ttft"] for r in rows)
    return result


def plot(rows: list[dict]) -> Path:
    def draw(ax) -> None:
        x = [r["turn2_prompt_tokens"] for r in rows]
        ax.scatter(x, [r["turn1_ttft"] * 1000 for r in rows], label="turn 1", marker="o")
        ax.scatter(x, [r["recompute_ttft"] * 1000 for r in rows], label="turn 2, history recomputed", marker="x")
        ax.scatter(x, [r["reuse_ttft"] * 1000 for r in rows], label="turn 2, history reused", marker="^")
        ax.set(title="Follow-up turns: time to first token", xlabel="turn 2 prompt tokens", ylabel="TTFT (ms)", ylim=0)
        ax.legend()

    return save_plot("follow_up", draw)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.follow_up", description=__doc__.splitlines()[0])
    add_common_options(parser, draft_model=True, dtype="float32", prompts_flag="--prompts-file", answer_tokens=True)
    parser.add_argument("--conversations", type=int, default=12, help="two-turn conversations (MT-Bench's first)")
    parser.add_argument("--engine", default="vllm", help="the server's engine (the hf engine keeps no prefix cache)")
    args = parser.parse_args()
    server_args = ["--target-model", args.target_model, "--dtype", args.dtype, "--engine", args.engine]
    with ServerProcess(server_args, log_prefix=None) as server:
        rows = run(args, server)
    result = summary(rows)
    print_table(
        ["", "turn 1", "turn 2 reused", "turn 2 recomputed"],
        [
            ["prompt tokens (median)", result["turn1_prompt_tokens"], result["turn2_prompt_tokens"], ""],
            [
                "TTFT ms (median)",
                f"{result['turn1_ttft'] * 1000:.0f}",
                f"{result['reuse_ttft'] * 1000:.0f}",
                f"{result['recompute_ttft'] * 1000:.0f}",
            ],
            [
                "prefix cache hits (median)",
                "",
                result["reuse_prefix_cache_hits"],
                result["recompute_prefix_cache_hits"],
            ],
            [
                "tokens/s of the answer",
                "",
                f"{result['reuse_tokens_per_second']:.1f}",
                f"{result['recompute_tokens_per_second']:.1f}",
            ],
        ],
    )
    print(f"turn 2 TTFT, reused / recomputed (median of per-conversation ratios): {result['turn2_ttft_ratio']:.2f}")
    path = write_json("follow_up", {"args": vars(args), "summary": result, "conversations": rows})
    print(f"wrote {path} and {plot(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
