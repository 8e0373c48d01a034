"""Is a replayed device faithful? Real edge processes and replayed devices answer the same prompts side by side.

At a fixed length without pipelining, a replayed device must commit the same tokens in the same rounds as the
real edge (greedy, fp32): its drafts are the real drafter's, recorded. With the adaptive controller and
pipelining, timing enters (how far a device drafts while a round is out), so the two are compared on acceptance
and tokens per round.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from wisp_bench.devices import edge_client, replay_drafter
from wisp_bench.replay import Recording
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_edge.controller import AcceptancePredictor


@dataclass(frozen=True)
class Answer:
    token_ids: list[int]
    rounds: int
    sent: int
    accepted: int


@dataclass(frozen=True)
class Comparison:
    mode: str  # "fixed" or "adaptive, pipelined"
    real: list[Answer]
    replayed: list[Answer]

    @property
    def identical(self) -> int:
        """Prompts answered with the same tokens in the same rounds, with the same drafts accepted."""
        return sum(a == b for a, b in zip(self.real, self.replayed))

    @staticmethod
    def _figures(answers: list[Answer]) -> tuple[float, float]:
        tokens, rounds = sum(len(a.token_ids) for a in answers), sum(a.rounds for a in answers)
        return sum(a.accepted for a in answers) / max(1, sum(a.sent for a in answers)), tokens / max(1, rounds)

    def summary(self) -> dict:
        (real_acceptance, real_tpr), (replay_acceptance, replay_tpr) = map(self._figures, (self.real, self.replayed))
        return {
            "mode": self.mode,
            "prompts": len(self.real),
            "identical": self.identical,
            "same_tokens": sum(a.token_ids == b.token_ids for a, b in zip(self.real, self.replayed)),
            "acceptance_real": real_acceptance,
            "acceptance_replayed": replay_acceptance,
            "tokens_per_round_real": real_tpr,
            "tokens_per_round_replayed": replay_tpr,
            "tokens_per_round_difference": replay_tpr / real_tpr - 1 if real_tpr else None,
        }


def real_edges(address: str, texts: list[str], args: list[str], workdir: Path, edges: int) -> list[Answer]:
    """``edges`` `wisp-edge generate` processes at once, each with every ``edges``-th prompt; answers in order."""
    processes = []
    for e in range(edges):
        prompts, output = workdir / f"edge{e}.jsonl", workdir / f"edge{e}.out.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts[e::edges]))
        command = [sys.executable, "-m", "wisp_edge.cli", "generate", "--server", address, "--threads", "1"]
        command += ["--prompts-file", str(prompts), "--output", str(output), *args]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for process in processes:
        if process.wait(timeout=1800) != 0:
            raise RuntimeError(f"a real edge failed: {process.stderr.read()[-2000:]}")
    answers: list[Answer | None] = [None] * len(texts)
    for e in range(edges):
        lines = (workdir / f"edge{e}.out.jsonl").read_text().splitlines()
        for i, line in zip(range(e, len(texts), edges), lines):
            r = json.loads(line)
            answers[i] = Answer(r["token_ids"], r["rounds"], r["sent"], r["accepted"])
    return answers  # type: ignore[return-value]


def replayed_devices(
    address: str,
    prompt_ids: list[list[int]],
    recordings: list[Recording],
    identity: pb.ModelIdentity,
    predictor: AcceptancePredictor | None,
    draft_tokens: int,
    max_new_tokens: int,
    seconds_per_token: float,
    features: tuple[int, ...] | None,
    devices: int,
) -> list[Answer]:
    """``devices`` replayed devices at once on loopback (no emulated delay), split as `real_edges` splits: adaptive
    and pipelined with a ``predictor``, as the real adaptive edge is by default; else a fixed length."""
    answers: list[Answer | None] = [None] * len(prompt_ids)

    def device(d: int) -> None:
        channel = grpc.insecure_channel(address)
        pipeline = predictor is not None
        drafter = replay_drafter(recordings, seconds_per_token, features)
        client = edge_client(channel, drafter, identity, None, predictor, pipeline)
        for i in range(d, len(prompt_ids), devices):
            result = client.generate(prompt_ids[i], max_new_tokens=max_new_tokens, draft_tokens=draft_tokens)
            s = result.stats
            answers[i] = Answer(result.token_ids, s.rounds, s.sent, s.accepted)

    threads = [threading.Thread(target=device, args=(d,)) for d in range(devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers  # type: ignore[return-value]


def validate(
    address: str,
    texts: list[str],
    prompt_ids: list[list[int]],
    recordings: list[Recording],
    identity: pb.ModelIdentity,
    draft_model: str,
    predictor: AcceptancePredictor,
    draft_tokens: int,
    max_new_tokens: int,
    seconds_per_token: float,
    features: tuple[int, ...] | None,
    workdir: Path,
    modes: tuple[str, ...] = ("fixed", "adaptive"),
    edges: int = 2,
) -> list[Comparison]:
    common = ["--draft-model", draft_model, "--dtype", "float32", "--draft-tokens", str(draft_tokens)]
    common += ["--max-new-tokens", str(max_new_tokens), "--pacing", "edge"]  # a verdict answers each round
    comparisons = []
    for mode in modes:
        adaptive = mode == "adaptive"
        # The real edges' defaults for each mode: the adaptive one pipelines and lets the server decode.
        args = [*common, "--speculation", mode, "--pipeline" if adaptive else "--no-pipeline"]

        real = real_edges(address, texts, args, workdir, edges)
        replayed = replayed_devices(
            address,
            prompt_ids,
            recordings,
            identity,
            predictor if adaptive else None,
            draft_tokens,
            max_new_tokens,
            seconds_per_token,
            features,
            edges,
        )
        comparisons.append(Comparison("adaptive, pipelined" if adaptive else "fixed", real, replayed))
    return comparisons
