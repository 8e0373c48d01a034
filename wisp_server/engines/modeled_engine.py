"""`modeled` backend: exact greedy verdicts from recorded answers, batch time from a GPU cost model.

On this project's CPUs a forward pass costs in proportion to its tokens, so
verifying drafts never pays. On a GPU a verification step reads the target's
weights once whatever the batch, so verifying a few tokens per session costs
about one decode step until the batch turns compute-bound. This engine lets
the real server (gRPC, scheduler, estimator, controller) and real devices
run in that regime without the GPU:

* verdicts are exact: the target's greedy continuation of every prompt is
  recorded once elsewhere (`load_answers`), and greedy verification against
  the real target accepts a draft exactly while it equals that continuation;
* each `verify` sleeps until its start plus the batch's modeled time
  (`GpuCostModel.step_seconds`), a roofline of a named GPU and target.

Greedy only, no features. The figures are modeled, not measured: see
docs/modeled-gpu.md for the formula, every constant's source and what is an
assumption.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wisp_common.request import SamplingParams
from wisp_server.engines.base import EngineFull, EngineInfo, RoundRequest, RoundVerdict, VerificationEngine
from wisp_server.estimator import SequenceShape

GPU_MODELS_PATH = Path(__file__).with_name("gpu_models.json")

Answers = dict[tuple[int, ...], list[int]]


# ---------------------------------------------------------------------------------------------------------------------
# The cost model


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bandwidth: float  # bytes/s, the data sheet's peak
    peak_flops: float  # dense bf16 FLOP/s, the data sheet's peak (without sparsity)
    memory_efficiency: float  # fraction of the bandwidth a step achieves
    compute_efficiency: float  # fraction of the peak a step achieves
    step_overhead_s: float  # fixed host-side cost of every step (scheduling, launches, sampling)


@dataclass(frozen=True)
class TargetSpec:
    name: str
    parameters: int
    layers: int
    hidden_size: int
    intermediate_size: int  # the MLP's width: not in the roofline (parameters are), but a model of this shape needs it
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    bytes_per_parameter: float
    bytes_per_kv_element: float

    @property
    def lookup_parameters(self) -> int:
        """The untied input embedding table: rows are looked up, never read in full nor multiplied."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def matmul_parameters(self) -> int:
        """Parameters every step reads once and every new token multiplies (the output head included)."""
        return self.parameters - self.lookup_parameters

    @property
    def weight_bytes(self) -> float:
        return self.matmul_parameters * self.bytes_per_parameter

    @property
    def kv_bytes_per_token(self) -> float:
        """Keys and values of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_kv_element


@dataclass(frozen=True)
class StepCost:
    """One step's roofline terms; ``seconds`` is what the engine sleeps."""

    bytes: float
    flops: float
    memory_seconds: float
    compute_seconds: float
    overhead_seconds: float

    @property
    def seconds(self) -> float:
        if self.bytes == 0 and self.flops == 0:
            return 0.0  # nothing to run: no step
        return max(self.memory_seconds, self.compute_seconds) + self.overhead_seconds

    @property
    def compute_bound(self) -> bool:
        return self.compute_seconds > self.memory_seconds


@dataclass(frozen=True)
class GpuCostModel:
    """A roofline of one verification step of ``target`` on ``gpu``.

    For a batch of sequences, each with ``c`` tokens already in its KV cache and ``n`` new tokens
    (uncached context, e.g. a first round's whole prompt, plus drafts):

    * bytes = W + sum (c + n) * K, where W = matmul parameters x bytes per parameter (the weights,
      read once per step) and K = 2 x layers x KV heads x head_dim x bytes per KV element (the KV
      read for the cached tokens and written for the new ones); activations are ignored;
    * FLOPs = sum 2 * N * n + 4 * layers * heads * head_dim * (n * c + n * (n + 1) / 2), where N is
      the matmul parameters (every new token is multiplied by every weight) and the second term is
      attention (QK^T and AV, causal over the new tokens);
    * seconds = max(bytes / (bandwidth * memory efficiency), FLOPs / (peak * compute efficiency))
      + per-step overhead.
    """

    name: str
    gpu: GpuSpec
    target: TargetSpec
    calibration: Mapping[str, Any] | None = None  # the measured fit the efficiencies came from, if any

    def step_cost(self, shapes: Sequence[SequenceShape]) -> StepCost:
        t = self.target
        attention_width = 4 * t.layers * t.attention_heads * t.head_dim
        live = [s for s in shapes if s.new_tokens > 0]
        if not live:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0)
        kv_tokens = sum(s.context_tokens + s.new_tokens for s in live)
        nbytes = t.weight_bytes + kv_tokens * t.kv_bytes_per_token
        flops = sum(
            2.0 * t.matmul_parameters * s.new_tokens
            + attention_width * (s.new_tokens * s.context_tokens + s.new_tokens * (s.new_tokens + 1) / 2)
            for s in live
        )
        return StepCost(
            bytes=nbytes,
            flops=flops,
            memory_seconds=nbytes / (self.gpu.memory_bandwidth * self.gpu.memory_efficiency),
            compute_seconds=flops / (self.gpu.peak_flops * self.gpu.compute_efficiency),
            overhead_seconds=self.gpu.step_overhead_s,
        )

    def step_seconds(self, shapes: Sequence[SequenceShape]) -> float:
        """Modeled wall time of one step over ``shapes`` (0 for an empty batch)."""
        return self.step_cost(shapes).seconds


def _value(entry: Any, what: str) -> Any:
    if not isinstance(entry, dict) or "value" not in entry or not entry.get("source"):
        raise ValueError(f"{what} must be {{'value': ..., 'source': ...}} with a non-empty source, got {entry!r}")
    return entry["value"]


def known_gpu_models(path: Path | str = GPU_MODELS_PATH) -> list[str]:
    with open(path) as f:
        return sorted(json.load(f)["models"])


def load_gpu_model(name: str, path: Path | str = GPU_MODELS_PATH) -> GpuCostModel:
    """The named GPU/target combination of ``gpu_models.json``, e.g. ``a100-80gb/qwen3-32b``.

    A filled ``calibration`` (measured ``memory_efficiency``, ``compute_efficiency`` and
    ``step_overhead_s``) replaces the assumed figures.
    """
    with open(path) as f:
        table = json.load(f)
    models = table["models"]
    if name not in models:
        raise ValueError(f"unknown GPU model {name!r}; known: {', '.join(sorted(models))} (from {path})")
    entry = models[name]
    gpu, target = table["gpus"][entry["gpu"]], table["targets"][entry["target"]]
    where = f"{path}: {name}"
    efficiencies = {
        key: float(_value(entry[key], f"{where}.{key}"))
        for key in ("memory_efficiency", "compute_efficiency", "step_overhead_s")
    }
    calibration = entry.get("calibration")
    if calibration is not None:
        missing = [key for key in efficiencies if key not in calibration]
        if missing:
            raise ValueError(f"{where}.calibration lacks {missing}")
        efficiencies = {key: float(calibration[key]) for key in efficiencies}
    for key in ("memory_efficiency", "compute_efficiency"):
        if not 0 < efficiencies[key] <= 1:
            raise ValueError(f"{where}: {key} must be in (0, 1], got {efficiencies[key]}")
    if efficiencies["step_overhead_s"] < 0:
        raise ValueError(f"{where}: step_overhead_s must be >= 0")

    def t(key: str) -> Any:
        return _value(target[key], f"{path}: targets.{entry['target']}.{key}")

    def g(key: str) -> Any:
        return _value(gpu[key], f"{path}: gpus.{entry['gpu']}.{key}")

    return GpuCostModel(
        name=name,
        gpu=GpuSpec(
            name=gpu["name"],
            memory_bandwidth=float(g("memory_bandwidth_bytes_per_s")),
            peak_flops=float(g("peak_bf16_flops_per_s")),
            **efficiencies,
        ),
        target=TargetSpec(
            name=target["name"],
            parameters=int(t("parameters")),
            layers=int(t("layers")),
            hidden_size=int(t("hidden_size")),
            intermediate_size=int(t("intermediate_size")),
            attention_heads=int(t("attention_heads")),
            kv_heads=int(t("kv_heads")),
            head_dim=int(t("head_dim")),
            vocab_size=int(t("vocab_size")),
            tie_word_embeddings=bool(t("tie_word_embeddings")),
            bytes_per_parameter=float(t("bytes_per_parameter")),
            bytes_per_kv_element=float(t("bytes_per_kv_element")),
        ),
        calibration=calibration,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Recorded answers


def load_answers(path: Path | str) -> Answers:
    """Reads the target's recorded greedy answers.

    One JSON object a line: ``{"prompt_token_ids": [...], "answer_token_ids": [...]}``, the answer
    being the target's greedy continuation of the prompt. A prompt recorded twice keeps the longer
    answer when one extends the other; answers that disagree are an error.
    """
    answers: Answers = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt = tuple(int(t) for t in record["prompt_token_ids"])
                answer = [int(t) for t in record["answer_token_ids"]]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}:{number}: expected {{'prompt_token_ids': [...], 'answer_token_ids': [...]}}: {error}"
                ) from None
            if not prompt:
                raise ValueError(f"{path}:{number}: empty prompt")
            known = answers.get(prompt)
            if known is not None:
                shorter, longer = sorted((known, answer), key=len)
                if longer[: len(shorter)] != shorter:
                    raise ValueError(f"{path}:{number}: a second, different answer for a prompt recorded before")
                answer = longer
            answers[prompt] = answer
    return answers


# ---------------------------------------------------------------------------------------------------------------------
# The engine


class AnswerExhausted(RuntimeError):
    """A session ran past the end of its recorded answer: record longer answers."""


@dataclass
class _Session:
    answer: list[int]  # the target's greedy continuation of the session's recorded prompt
    position: int  # answer tokens committed so far
    uncached: int  # committed tokens not yet in the (modeled) KV cache
    cached: int = 0
    reserved: int = 0  # KV tokens held for the session's whole life (with a capacity)


class ModeledVerificationEngine(VerificationEngine):
    """Exact greedy verdicts from ``answers``; each `verify` lasts ``cost``'s modeled step time.

    ``answers`` maps a prompt's token ids to the target's greedy continuation, long enough for
    every session (max new tokens plus the longest draft); see `load_answers`.

    ``kv_capacity_tokens``, if given, is the modeled GPU's KV cache in tokens: like the vLLM
    engine, each session reserves its ``max_tokens`` up front and a session that does not fit
    raises `EngineFull`. Without it (the default) the cache is unbounded.
    """

    name = "modeled"
    pads_batches = False  # a GPU engine (vLLM) runs unpadded sequences
    verifies_any_prompt = False  # only the recorded ones: the server's estimator learns from the first batches

    def __init__(
        self,
        info: EngineInfo,
        answers: Mapping[tuple[int, ...], Sequence[int]],
        cost: GpuCostModel,
        kv_capacity_tokens: int | None = None,
    ):
        self.info = info
        self.cost = cost
        self.kv_capacity_tokens = kv_capacity_tokens
        self._answers = {tuple(prompt): list(answer) for prompt, answer in answers.items()}
        if any(not prompt for prompt in self._answers):
            raise ValueError("recorded answers need non-empty prompts")
        self._prompt_lengths = sorted({len(p) for p in self._answers}, reverse=True)
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self.last_step: StepCost | None = None  # the cost of the latest verify

    def add_session(
        self,
        session_id: str,
        context: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        features: bool = False,
        known_features: int = 0,  # it serves no features
        feature_layers: tuple[int, ...] = (),
    ) -> None:
        if not context:
            raise ValueError("a session needs at least one context token")
        if not sampling.greedy:
            raise ValueError(
                f"the modeled engine is greedy-only (its verdicts come from recorded greedy answers); "
                f"got temperature {sampling.temperature}"
            )
        if features:
            raise ValueError("the modeled engine serves no features (it never runs the target)")
        context = [int(t) for t in context]
        session = self._match(context)
        session.reserved = max(max_tokens, len(context))
        with self._lock:
            if self.kv_capacity_tokens is not None:
                held = sum(s.reserved for sid, s in self._sessions.items() if sid != session_id)
                if held + session.reserved > self.kv_capacity_tokens:
                    raise EngineFull(
                        f"the modeled KV cache holds {self.kv_capacity_tokens} tokens, {held} are reserved; "
                        f"this session needs {session.reserved}"
                    )
            self._sessions[session_id] = session

    def kv_cache_usage(self) -> float:
        if self.kv_capacity_tokens is None:
            return math.nan
        with self._lock:
            return sum(s.reserved for s in self._sessions.values()) / self.kv_capacity_tokens

    def _match(self, context: list[int]) -> _Session:
        """The recorded prompt that starts ``context``, whose answer the rest of ``context`` follows."""
        diverged = None
        for length in self._prompt_lengths:  # longest first: the fewest positions to check
            if length > len(context):
                continue
            answer = self._answers.get(tuple(context[:length]))
            if answer is None:
                continue
            generated = context[length:]
            if answer[: len(generated)] == generated:
                return _Session(answer, position=len(generated), uncached=len(context))
            at = next((i for i, (a, b) in enumerate(zip(generated, answer)) if a != b), len(answer))
            diverged = diverged or (length, at)
        if diverged is not None:
            length, at = diverged
            raise ValueError(
                f"the context starts with a recorded prompt ({length} tokens) but its committed tokens leave the "
                f"recorded greedy answer at generated token {at}; the modeled engine can only continue it"
            )
        raise ValueError(
            f"no recorded answer for this prompt: the answers were not recorded for it (context of "
            f"{len(context)} tokens starting {context[:8]}); record the target's answers for every prompt served"
        )

    def remove_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def uncached_tokens(self, session_id: str) -> int:
        with self._lock:
            return self._sessions[session_id].uncached

    def step_shapes(self, batch: Sequence[RoundRequest]) -> list[SequenceShape]:
        """What each round of ``batch`` would compute: (tokens cached, uncached tokens + drafts)."""
        with self._lock:
            sessions = [self._sessions[r.session_id] for r in batch]
        return [SequenceShape(s.cached, s.uncached + len(r.drafts)) for s, r in zip(sessions, batch)]

    def verify(self, batch: Sequence[RoundRequest]) -> list[RoundVerdict]:
        start = time.perf_counter()
        with self._lock:
            sessions = [self._sessions[r.session_id] for r in batch]
        shapes = [SequenceShape(s.cached, s.uncached + len(r.drafts)) for s, r in zip(sessions, batch)]
        # Every verdict first, so a session past its answer leaves no session of the batch advanced.
        verdicts = [self._verdict(s, r) for s, r in zip(sessions, batch)]
        for s, verdict in zip(sessions, verdicts):
            s.cached += s.uncached + verdict.num_accepted
            s.position += verdict.num_accepted + 1
            s.uncached = 1  # the next token is committed but not yet cached
        self.last_step = self.cost.step_cost(shapes)
        remaining = start + self.last_step.seconds - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return verdicts

    @staticmethod
    def _verdict(session: _Session, request: RoundRequest) -> RoundVerdict:
        answer, at = session.answer, session.position
        accepted = 0
        for draft in request.drafts:
            if at + accepted >= len(answer):
                break
            if draft != answer[at + accepted]:
                break
            accepted += 1
        if at + accepted >= len(answer):
            raise AnswerExhausted(
                f"session {request.session_id} ran past its recorded answer of {len(answer)} tokens "
                f"(at generated token {at} with {len(request.drafts)} drafts); record longer answers "
                f"(at least max new tokens + the longest draft)"
            )
        return RoundVerdict(accepted, answer[at + accepted])
