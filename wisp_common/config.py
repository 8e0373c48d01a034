"""All configuration, typed, in one place.

Each daemon has one dataclass. Values come, in rising priority, from the
field defaults, a YAML file (``--config``), ``WISP_*`` environment variables and
command-line flags; `load_config` builds the flags from the dataclass itself so
the three sources can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_DRAFT = "smollm2-135m-wisp-draft"


DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 where the device computes in it, else float32
PACINGS = ("auto", "edge", "server")  # who paces a speculation session's steps (wisp_edge.client)

# gRPC refuses messages over 4 MiB by default. A verdict with target features carries 2 bytes x hidden size per
# token, and the first one the whole context: a hidden size of 4096 and 8192 tokens is 64 MiB.
GRPC_MAX_MESSAGE_BYTES = 2 * 4096 * 8192


def grpc_message_options(max_bytes: int) -> list[tuple[str, int]]:
    """gRPC server or channel options that allow messages of up to ``max_bytes`` each way."""
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


def keepalive_options(every: float, timeout: float, server: bool) -> list[tuple[str, int]]:
    """gRPC options that ping the peer every ``every`` seconds and drop the connection when a ping goes unanswered
    for ``timeout`` seconds: a peer that vanished (killed host, cut network, stopped process) is noticed even on
    an idle stream. A server also accepts the edges' pings (gRPC's default refuses them more often than every
    five minutes)."""
    options = [
        ("grpc.keepalive_time_ms", int(every * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server:
        options.append(("grpc.http2.min_ping_interval_without_data_ms", 1000))
    return options


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine for certain (a name other than localhost may resolve to anything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    gpu_memory_utilization: float = _opt(
        0.0, "vllm engine: fraction of GPU memory vLLM may use; sizes the KV cache instead of --kv-cache-gib (0: off)"
    )
    prefix_caching: bool = _opt(
        True,
        "vllm engine: reuse the KV cache of prompt prefixes computed before (a conversation's earlier turns); a "
        "feature-conditioned draft's session reuses only the positions whose features its edge kept",
    )
    tensor_parallel_size: int = _opt(1, "vllm engine: GPUs the target's layers are split across (tensor parallel)")
    pipeline_parallel_size: int = _opt(1, "vllm engine: stages the target's layers are split into (several nodes: Ray)")
    vllm_engine_args: str = _opt(
        "", 'vllm engine: any other vLLM EngineArgs, as a JSON object (e.g. {"quantization": "fp8"})'
    )
    grpc_max_message_bytes: int = _opt(
        GRPC_MAX_MESSAGE_BYTES, "largest gRPC message sent or received (verdicts carrying a large target's features)"
    )
    draft_check: str = _opt(
        "refuse",
        "a draft trained for other target weights of the same tokenizer (its drafts would rarely be accepted)",
        ("refuse", "warn", "off"),
    )
    generate_speculation: str = _opt(
        "",
        "Generate RPC (the target served alone): vLLM's own n-gram speculation, as vLLM's --speculative-config "
        'JSON, e.g. {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4} (empty: off)',
    )
    max_sessions: int = _opt(64, "concurrent sessions admitted")
    max_draft_tokens: int = _opt(8, "drafts accepted per round")
    max_context_tokens: int = _opt(2048, "prompt plus generated tokens per session")
    max_batch_sessions: int = _opt(16, "sessions verified in one batch")
    max_batch_tokens: int = _opt(1024, "new tokens (context tail plus drafts) in one batch")
    default_max_new_tokens: int = _opt(256, "used when a request does not set max_new_tokens")
    profile_estimator: bool = _opt(True, "time a grid of batches at start-up to seed the verification time estimator")
    estimator_cache: str = _opt(
        "auto",
        "directory the profiled estimator's fit is saved in, at start-up and stop; a server with the same engine and "
        "its settings, target, dtype, threads and hardware starts from it instead of profiling (auto: estimator/ "
        "beside $WISP_CACHE_DIR; none: never saved; nothing is without the profile)",
    )
    sled_window: float = _opt(0.05, "sled policy: seconds the oldest round may wait for a full batch")
    wisp_urgency: float = _opt(0.05, "wisp policy: slack (seconds) under which a round is urgent")
    wisp_max_wait: float = _opt(1.0, "wisp policy: seconds after which any waiting round goes first")
    session_idle_timeout: float = _opt(
        30.0, "seconds a session may wait for its edge's next round before the server closes it (a stalled edge)"
    )
    shutdown_grace: float = _opt(
        10.0, "on SIGTERM: seconds in-flight rounds get to finish; the rest are told UNAVAILABLE (resume elsewhere)"
    )
    retry_after_ms: int = _opt(1000, "refused for capacity (RESOURCE_EXHAUSTED): the retry-after-ms hint to edges")
    keepalive_seconds: float = _opt(20.0, "gRPC keepalive: seconds between pings to each edge")
    keepalive_timeout: float = _opt(10.0, "gRPC keepalive: seconds an unanswered ping waits before the edge is dropped")
    tls_cert: str = _opt("", "TLS: this server's certificate chain (PEM file); with --tls-key, serves TLS only")
    tls_key: str = _opt("", "TLS: this server's private key (PEM file)")
    tls_client_ca: str = _opt(
        "", "mutual TLS: CA certificates (PEM file) client certificates must chain to; set, every client needs one"
    )
    tokens_file: str = _opt(
        "", "per-device bearer tokens, one 'device_id token' line each; set, every call but health needs one"
    )
    sessions_per_minute: float = _opt(0.0, "sessions each device may open per minute, bursts included (0: no limit)")
    rounds_per_second: float = _opt(0.0, "draft rounds each device may send per second over all its sessions (0: off)")


@dataclass
class EdgeConfig:
    """The edge daemon and CLI (`wisp-edge`)."""

    server: str = _opt(
        "127.0.0.1:50051",
        "verification server host:port, a comma-separated list of them (new sessions are balanced over them), or a "
        "gRPC target such as dns:///wisp.example:50051 (calls balanced over its addresses)",
    )
    tls: bool = _opt(False, "connect with TLS, verifying the server against the system's CAs (or --tls-ca)")
    tls_ca: str = _opt("", "TLS: CA certificates (PEM file) to verify the server with; implies --tls")
    tls_cert: str = _opt("", "mutual TLS: this device's certificate (PEM file)")
    tls_key: str = _opt("", "mutual TLS: this device's private key (PEM file)")
    # repr=False: a config printed or logged never shows the secret.
    token: str = field(
        default="",
        repr=False,
        metadata={
            "help": "bearer token for the server (prefer WISP_TOKEN or --token-file: ps shows flags)",
            "choices": None,
        },
    )
    token_file: str = _opt("", "file holding this device's bearer token")
    draft_model: str = _opt(DEFAULT_DRAFT, "draft model: a WISP model name, HF id or local path")
    draft_tokens: int = _opt(4, "drafts per round: the most (adaptive) or always (fixed)")
    speculation: str = _opt(
        "adaptive", "round length: the speculation controller decides, or a fixed length (SLED)", ("adaptive", "fixed")
    )
    min_run_probability: float = _opt(
        0.25, "adaptive: send and draft only while P(every draft so far accepted) stays at least this"
    )
    lookup_ngram: int = _opt(
        4, "prompt lookup: the longest suffix of the context matched against its earlier text, from 2 up (0: off)"
    )
    lookup_below: float = _opt(0.5, "prompt lookup: replaces only drafts whose top-1 probability is below this")
    suffix: bool = _opt(
        False,
        "suffix decoding: propose what followed the context's end in the prompt, the answer and this device's "
        "earlier answers (kept in memory only), where that is likelier than the draft's own token",
    )
    suffix_max_bytes: int = _opt(64 << 20, "suffix decoding: memory for the earlier answers' index, bytes")
    suffix_max_depth: int = _opt(16, "suffix decoding: longest token sequence indexed (a match and its continuation)")
    suffix_min_probability: float = _opt(
        0.1, "suffix decoding: stop a proposal where its estimated probability of being right falls below this"
    )
    draft_probabilities: bool = _opt(
        True,
        "sampled sessions: send each draft's probabilities (its top tokens' q), so the server accepts it with "
        "probability min(1, p/q) rather than p (off: drafts are point masses)",
    )
    pipeline: bool = _opt(True, "keep drafting the next round while one is being verified")
    server_decoding: bool = _opt(
        True, "adaptive: where no draft pays at the server's load, let it decode the session itself (no round trips)"
    )
    pacing: str = _opt(
        "auto",
        "edge: each round waits for this edge's drafts; server: the server decodes at its own pace and verifies the "
        "drafts this edge streams; auto: server where a server step outlasts this edge's round trip plus a few "
        "drafts, measured in its sessions (the first is edge-paced)",
        PACINGS,
    )
    branch: bool = _opt(
        True,
        "server-paced, greedy: with the drafts that guess the token of the server's step in flight, also send "
        "(in the same message) drafts after the draft's runner-up for it; the next step verifies whichever fits",
    )
    dtype: str = _opt("float32", "draft weights and activations (auto: bfloat16 where the hardware has it)", DTYPES)
    device: str = _opt("auto", "device the draft runs on (auto: CUDA where present, e.g. a Jetson, else cpu)")
    threads: int = _opt(0, "torch intra-op threads (0: torch's default)")
    device_id: str = _opt("", "name this device reports to the server (default: its token's device, else host name)")
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
    round_timeout: float = _opt(
        10.0, "seconds to wait for a verdict at least (longer where the server's hints expect a long round)"
    )
    round_timeout_factor: float = _opt(8.0, "a verdict is given up on after this many times the server's estimate")
    max_retries: int = _opt(8, "reconnects in a row without progress before a generation fails")
    retry_backoff: float = _opt(0.25, "first reconnect's backoff, seconds; doubles each time, with full jitter")
    retry_backoff_max: float = _opt(8.0, "longest reconnect backoff, seconds")
    keepalive_seconds: float = _opt(20.0, "gRPC keepalive: seconds between pings to the server")
    keepalive_timeout: float = _opt(10.0, "gRPC keepalive: seconds an unanswered ping waits before reconnecting")
    host: str = _opt("127.0.0.1", "serve: address the OpenAI-compatible HTTP API listens on")
    port: int = _opt(8080, "serve: HTTP port of the OpenAI-compatible API")
    api_key: str = _opt("", "serve: clients must send 'Authorization: Bearer KEY' (empty: no key asked)")
    max_concurrent_requests: int = _opt(
        4, "serve: requests generated at once (one draft state each, weights shared); more get 429"
    )
    served_model_name: str = _opt("", "serve: model id in the API (default: the server's target model)")
    grpc_max_message_bytes: int = _opt(
        GRPC_MAX_MESSAGE_BYTES, "largest gRPC message sent or received (verdicts carrying a large target's features)"
    )


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
    exclude_file: str = _opt(
        "", "prompts to keep out of training, e.g. evaluation sets (8-word overlap); several files comma-separated"
    )
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
    feature_layers: str = _opt(
        "",
        "the target's decoder layers (0-based, comma-separated, e.g. 2,14) the draft reads beside its top one, as "
        "EAGLE-3 does (none, or the --init-from draft's)",
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
