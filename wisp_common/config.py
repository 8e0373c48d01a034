"""All configuration, typed, in one place.

Each daemon has one dataclass. Values come, in rising priority, from the
field defaults, a YAML file (``--config``), ``WISP_*`` environment variables and
command-line flags; `load_config` builds the flags from the dataclass itself so
the three sources can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_DRAFT = "smollm2-135m-wisp-draft"


DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 where the device computes in it, else float32


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ServerConfig:
    """The verification server (`wisp-server`)."""

    target_model: str = _opt(DEFAULT_TARGET, "target model: a WISP model name, HF id or local path")
    engine: str = _opt(
        "auto",
        "verification engine backend (auto: vllm where it is installed; modeled: exact greedy verdicts from "
        "--answers, batch time from the --gpu-model cost model)",
        ("auto", "vllm", "hf", "modeled"),
    )
    gpu_model: str = _opt("a100-80gb/qwen3-32b", "modeled engine: the GPU and target whose step time it models")
    answers: str = _opt("", "modeled engine: the target's recorded greedy answers (JSONL, from wisp-bench record)")
    policy: str = _opt("wisp", "batch scheduling policy", ("wisp", "sled", "fcfs"))
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(50051, "gRPC port (0 picks a free one)")
    metrics_port: int = _opt(9464, "Prometheus /metrics HTTP port (0 picks a free one, -1 turns it off)")
    dtype: str = _opt("float32", "target weights and activations (auto: bfloat16 where the hardware has it)", DTYPES)
    device: str = _opt("auto", "device the target runs on (auto: CUDA where present, else cpu; cuda:1, ...)")
    threads: int = _opt(0, "torch intra-op threads (0: torch's default)")
    kv_cache_gib: float = _opt(2.0, "vllm engine: memory for the paged KV cache, GiB")
    max_sessions: int = _opt(64, "concurrent sessions admitted")
    max_draft_tokens: int = _opt(8, "drafts accepted per round")
    max_context_tokens: int = _opt(2048, "prompt plus generated tokens per session")
    max_batch_sessions: int = _opt(16, "sessions verified in one batch")
    max_batch_tokens: int = _opt(1024, "new tokens (context tail plus drafts) in one batch")
    default_max_new_tokens: int = _opt(256, "used when a request does not set max_new_tokens")
    profile_estimator: bool = _opt(True, "time a grid of batches at start-up to seed the verification time estimator")
    sled_window: float = _opt(0.05, "sled policy: seconds the oldest round may wait for a full batch")
    wisp_urgency: float = _opt(0.05, "wisp policy: slack (seconds) under which a round is urgent")
    wisp_max_wait: float = _opt(1.0, "wisp policy: seconds after which any waiting round goes first")


@dataclass
class EdgeConfig:
    """The edge daemon and CLI (`wisp-edge`)."""

    server: str = _opt("127.0.0.1:50051", "verification server address host:port")
    draft_model: str = _opt(DEFAULT_DRAFT, "draft model: a WISP model name, HF id or local path")
    draft_tokens: int = _opt(4, "drafts per round: the most (adaptive) or always (fixed)")
    speculation: str = _opt(
        "adaptive", "round length: the speculation controller decides, or a fixed length (SLED)", ("adaptive", "fixed")
    )
    min_run_probability: float = _opt(0.25, "adaptive: stop drafting when P(every draft so far accepted) falls below")
    lookup_ngram: int = _opt(
        4, "prompt lookup: the longest suffix of the context matched against its earlier text, from 2 up (0: off)"
    )
    lookup_below: float = _opt(0.5, "prompt lookup: replaces only drafts whose top-1 probability is below this")
    pipeline: bool = _opt(True, "keep drafting the next round while one is being verified")
    server_decoding: bool = _opt(
        True, "adaptive: where no draft pays at the server's load, let it decode the session itself (no round trips)"
    )
    dtype: str = _opt("float32", "draft weights and activations (auto: bfloat16 where the hardware has it)", DTYPES)
    device: str = _opt("auto", "device the draft runs on (auto: CUDA where present, e.g. a Jetson, else cpu)")
    threads: int = _opt(0, "torch intra-op threads (0: torch's default)")
    device_id: str = _opt("", "name this device reports to the server (default: host name)")
    device_kind: str = _opt(
        "auto", "device kind reported to the server: auto (detected), jetson-orin-nano, raspberry-pi-5, laptop, ..."
    )
    max_new_tokens: int = _opt(128, "tokens to generate")
    temperature: float = _opt(0.0, "sampling temperature (0: greedy)")
    top_p: float = _opt(1.0, "nucleus sampling mass (1: off)")
    top_k: int = _opt(0, "top-k sampling (0: off)")
    ignore_eos: bool = _opt(False, "keep generating past the end-of-sequence token")
    seed: int = _opt(0, "sampling seed (0: random)")
    ttft_slo: float = _opt(2.0, "time-to-first-token target, seconds")
    tpot_slo: float = _opt(0.25, "time-per-output-token target, seconds")
    chat: bool = _opt(True, "wrap prompts in the model's chat template")


@dataclass
class DistillConfig:
    """Draft distillation (`wisp-distill`)."""

    target_model: str = _opt(DEFAULT_TARGET, "target model the draft is trained for: WISP model name, HF id or path")
    output: str = _opt("wisp-draft", "directory the trained draft is written to")
    work_dir: str = _opt("", "data and checkpoints, kept for resuming (default: OUTPUT.work)")
    stage: str = _opt("all", "run one stage, or all of them in turn", ("all", "generate", "train", "export"))
    engine: str = _opt("auto", "engine that generates the target's answers", ("auto", "vllm", "hf"))
    dtype: str = _opt("auto", "target dtype while generating (auto: bfloat16 where the hardware has it)", DTYPES)
    train_dtype: str = _opt(
        "auto", "training's autocast dtype (auto: bfloat16 where the hardware has it)", ("auto", "float32", "bfloat16")
    )
    device: str = _opt("auto", "torch device for training and the hf engine (auto: cuda if present, else cpu)")
    threads: int = _opt(0, "torch intra-op threads (0: torch's default)")
    prompts_file: str = _opt("", "prompts to answer (JSONL / ShareGPT) instead of --prompt-source")
    prompt_source: str = _opt(
        "self",
        "prompts without --prompts-file: the target writes them itself (self: sampled after its chat template's "
        "user header, as Magpie does), or built-in templates",
        ("self", "templates"),
    )
    task_openings: bool = _opt(
        True, "self-written prompts start with a task's opening words (Write a, Solve, ...), for a mix of tasks"
    )
    exclude_file: str = _opt("", "prompts to keep out of training, e.g. an evaluation set (8-word overlap)")
    num_prompts: int = _opt(4000, "prompts to answer")
    max_answer_tokens: int = _opt(256, "tokens per answer at most")
    concurrency: int = _opt(48, "answers generated at once")
    kv_cache_gib: float = _opt(2.0, "vllm engine: KV cache while generating, GiB")
    head_vocab: int = _opt(
        16384, "size of the draft's trimmed output vocabulary (with --init-from: its head, widened or narrowed to it)"
    )
    draft_layers: int = _opt(
        0,
        "decoder layers in the draft (0: one, or the --init-from draft's; more than it has are added, starting as "
        "identity)",
    )
    init_from: str = _opt(
        "", "start training from this wisp-distill draft (name or path), e.g. to adapt it to new prompts"
    )
    epochs: float = _opt(4.0, "passes over the training answers")
    batch_tokens: int = _opt(4096, "tokens per training batch")
    learning_rate: float = _opt(1e-3, "AdamW peak learning rate (warm-up, then cosine decay)")
    feature_noise: float = _opt(0.1, "uniform noise on input features, a fraction of their std")
    token_loss_weight: float = _opt(
        0.1, "weight of the token loss (soft cross entropy) beside the feature loss (weight 1)"
    )
    unroll: int = _opt(
        1, "training-time test: 1 trains on the target's features only; N adds N-1 steps on the draft's own"
    )
    eval_fraction: float = _opt(0.05, "answers held out to measure agreement")
    log_every: float = _opt(30.0, "seconds between progress lines")
    seed: int = _opt(0, "prompt and training seed")


C = TypeVar("C")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(cls: type, name: str, value: Any) -> Any:
    kind = _field_types(cls)[name]
    if kind is bool:
        return value if isinstance(value, bool) else _parse_bool(str(value))
    return kind(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one ``--flag`` per field of ``cls``; unset flags stay ``None``."""
    parser.add_argument("--config", type=Path, help="YAML file with any of the options below")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_types(cls)[f.name]
        env = f"WISP_{f.name.upper()}"
        help_text = f"{f.metadata['help']} (default: {f.default}; env {env})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, choices=f.metadata["choices"], help=help_text)


def config_from_args(cls: type[C], args: argparse.Namespace, environ: dict[str, str] | None = None) -> C:
    """Builds ``cls`` from defaults < YAML file < WISP_* environment < flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = set(loaded) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SystemExit(f"{args.config}: unknown option(s) {sorted(unknown)}")
        values.update({k: _coerce(cls, k, v) for k, v in loaded.items()})
    for f in dataclasses.fields(cls):
        env = environ.get(f"WISP_{f.name.upper()}")
        if env is not None:
            values[f.name] = _coerce(cls, f.name, env)
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    config = cls(**values)
    for f in dataclasses.fields(cls):
        choices = f.metadata["choices"]
        if choices and getattr(config, f.name) not in choices:
            raise SystemExit(f"{f.name} must be one of {choices}, not {getattr(config, f.name)!r}")
    return config
