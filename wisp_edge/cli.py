"""`wisp-edge`: the edge command line.

    wisp-edge generate "What is the capital of France?"
    wisp-edge generate --prompts-file questions.jsonl --output answers.jsonl
    wisp-edge calibrate [--prompts-file questions.jsonl]
    wisp-edge info
    wisp-edge serve [--port 8080] [--api-key KEY]
    wisp-edge chat

`generate` drafts locally, verifies on the server and streams the committed
text as it arrives; a one-line summary follows on stderr. With a prompts
file it answers each prompt in turn and writes token ids, text and
statistics as JSONL. `calibrate` answers prompts with a fixed, long draft,
logs which draft tokens the target accepted and fits the speculation
controller's acceptance predictor to them, saved beside the draft. `serve`
runs an OpenAI-compatible HTTP API (docs/edge-daemon.md); `chat` is an
interactive conversation in the terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
from collections.abc import Callable

import grpc

from wisp_common import device_kind
from wisp_common.config import EdgeConfig, add_config_arguments, config_from_args
from wisp_common.prompts import encode_prompt, load_prompts
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.request import SamplingParams, Slo
from wisp_edge.connection import connect


class TextStream:
    """Turns committed token ids into printable text, holding back half-decoded characters."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.write = write
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, new_tokens: list[int]) -> None:
        self.tokens += new_tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        self.write(text[self.printed :])
        self.printed = len(text)


def build_client(config: EdgeConfig):
    """Loads the draft model and connects; imports torch lazily so `--help` stays fast."""
    clients, tokenizer = build_clients(config, 1)
    return clients[0], tokenizer


def build_clients(config: EdgeConfig, count: int, wait_when_full: bool = True):
    """``count`` clients on one channel, each with its own drafter over the draft weights, loaded once.
    ``wait_when_full``: see `ResumePolicy`."""
    import torch
    import transformers

    from wisp_common.identity import draft_identity
    from wisp_common.models import load_tokenizer, resolve_model
    from wisp_edge.client import EdgeClient, ResumePolicy
    from wisp_edge.controller import AcceptancePredictor, AdaptiveSpeculation, FixedLength
    from wisp_edge.draft_loader import drafter_factory
    from wisp_edge.lookup import PromptLookup
    from wisp_edge.suffix import SuffixDecoding

    transformers.utils.logging.disable_progress_bar()
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = load_tokenizer(config.draft_model)
    make_drafter = drafter_factory(
        config.draft_model,
        sampling_of(config),
        config.dtype,
        config.device,
        PromptLookup.of(config),
        SuffixDecoding.of(config),
        config.draft_probabilities,
    )
    identity = draft_identity(config.draft_model, tokenizer)
    # With a token the server knows the device from it: an edge that names none is the token's.
    named = config.device_id or ("" if config.token or config.token_file else socket.gethostname())
    device = pb.DeviceInfo(device_id=named, kind=device_kind_of(config))
    channel = connect(config)
    if config.speculation == "adaptive":
        predictor = AcceptancePredictor.beside(resolve_model(config.draft_model))
        speculation = AdaptiveSpeculation.mode_with(predictor, config.min_run_probability)
    else:
        speculation = FixedLength
    server_decoding = config.speculation == "adaptive" and config.server_decoding
    resume = dataclasses.replace(ResumePolicy.of(config), wait_when_full=wait_when_full)
    clients = [
        EdgeClient(
            channel,
            make_drafter(),
            identity,
            device,
            speculation,
            config.pipeline,
            server_decoding,
            resume,
            config.pacing,
            config.branch,
        )
        for _ in range(count)
    ]
    return clients, tokenizer


def device_kind_of(config: EdgeConfig) -> str:
    return device_kind.detect() if config.device_kind == "auto" else config.device_kind


def sampling_of(config: EdgeConfig) -> SamplingParams:
    return SamplingParams(config.temperature, config.top_p, config.top_k, config.seed)


def generate_one(client, tokenizer, config: EdgeConfig, prompt: str, on_tokens=None):
    """One session for ``prompt``, with everything the config says about it."""
    return client.generate(
        encode_prompt(tokenizer, prompt, config.chat),
        max_new_tokens=config.max_new_tokens,
        draft_tokens=config.draft_tokens,
        sampling=sampling_of(config),
        ignore_eos=config.ignore_eos,
        slo=Slo(config.ttft_slo, config.tpot_slo),
        on_tokens=on_tokens,
    )


def cmd_generate(config: EdgeConfig, args: argparse.Namespace) -> int:
    if args.prompts_file:
        prompts = load_prompts(args.prompts_file, args.limit)
    elif args.prompt is None:
        raise SystemExit("wisp-edge generate: give a prompt, - for stdin, or --prompts-file")
    else:
        prompts = [sys.stdin.read() if args.prompt == "-" else args.prompt]
    client, tokenizer = build_client(config)
    output = open(args.output, "w") if args.output else None
    try:
        for index, prompt in enumerate(prompts):
            if len(prompts) > 1:
                print(f"--- [{index + 1}/{len(prompts)}] {prompt[:70]!r}", file=sys.stderr, flush=True)
            stream = TextStream(tokenizer, lambda text: print(text, end="", flush=True))
            result = generate_one(client, tokenizer, config, prompt, on_tokens=stream)
            print(flush=True)
            summary = {"finish_reason": result.finish_reason, **result.stats.summary()}
            print(json.dumps(summary) if args.summary_json else _describe(summary), file=sys.stderr, flush=True)
            if output:
                record = {"prompt": prompt, "text": tokenizer.decode(result.token_ids, skip_special_tokens=True)}
                output.write(json.dumps({**record, "token_ids": result.token_ids, **summary}) + "\n")
                output.flush()
    finally:
        if output:
            output.close()
    return 0


def _describe(s: dict) -> str:
    return (
        f"[{s['tokens']} tokens in {s['rounds']} rounds, acceptance {s['acceptance_rate']:.0%}, "
        f"{s['tokens_per_round']:.2f} tokens/round, {s['tokens_per_second']:.1f} tokens/s, "
        f"TTFT {s['ttft_seconds'] * 1000:.0f} ms, finish: {s['finish_reason']}]"
    )


def cmd_calibrate(config: EdgeConfig, args: argparse.Namespace) -> int:
    """Fits the acceptance predictor on this draft/target pair's own verdicts."""
    from pathlib import Path

    from wisp_common.models import resolve_model
    from wisp_common.training_prompts import training_prompts
    from wisp_edge.controller import PREDICTOR_FILE, AcceptancePredictor, FixedLength, verdict_labels

    if args.prompts_file:
        prompts = load_prompts(args.prompts_file, args.limit)
    else:  # other draws than the ones wisp-distill trains on (seed 0)
        prompts = training_prompts(args.limit, seed=1)
    client, tokenizer = build_client(config)
    client.speculation, client.pipeline, client.round_log = FixedLength, False, []  # long rounds: labels deep in them
    client.server_decoding, client.pacing = False, "edge"
    for index, prompt in enumerate(prompts):
        result = generate_one(client, tokenizer, config, prompt)
        summary = {"finish_reason": result.finish_reason, **result.stats.summary()}
        print(f"[{index + 1}/{len(prompts)}] {_describe(summary)}", file=sys.stderr, flush=True)
    rows = [row for entry in client.round_log for row in verdict_labels(*entry)]
    fitted = AcceptancePredictor.fit(rows)
    output = Path(args.output) if args.output else Path(resolve_model(config.draft_model)) / PREDICTOR_FILE
    fitted.save(output)
    prior = AcceptancePredictor()
    print(
        f"{len(rows)} labelled draft tokens ({sum(r[2] for r in rows) / len(rows):.0%} accepted); log loss "
        f"{prior.log_loss(rows):.3f} with the prior, {fitted.log_loss(rows):.3f} fitted; written to {output}"
    )
    return 0


def cmd_info(config: EdgeConfig, args: argparse.Namespace) -> int:
    from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc

    stub = pb_grpc.WispStub(connect(config))
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    print(info)
    return 0


def cmd_serve(config: EdgeConfig, args: argparse.Namespace) -> int:
    from wisp_edge.openai_api import serve

    if config.max_concurrent_requests < 1:
        raise SystemExit("wisp-edge serve: --max-concurrent-requests must be at least 1")
    # A full server is answered at once with 429 and its Retry-After: the HTTP client decides whether to wait.
    clients, tokenizer = build_clients(config, config.max_concurrent_requests, wait_when_full=False)
    info = clients[0].stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    return serve(clients, tokenizer, config, config.served_model_name or info.target_model.name)


def cmd_chat(config: EdgeConfig, args: argparse.Namespace) -> int:
    from wisp_edge.chat import run_chat

    client, tokenizer = build_client(config)
    return run_chat(client, tokenizer, config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wisp-edge", description="WISP edge: draft locally, verify on the server.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate text for a prompt, streamed as it is committed")
    generate.add_argument("prompt", nargs="?", help="the prompt text, or - to read it from stdin")
    generate.add_argument("--prompts-file", help="JSONL (prompt / MT-Bench turns / ShareGPT) of prompts to answer")
    generate.add_argument("--limit", type=int, help="answer only the first N prompts of --prompts-file")
    generate.add_argument("--output", help="write one JSON line per answer: text, token ids, statistics")
    generate.add_argument("--summary-json", action="store_true", help="print each summary as JSON on stderr")
    calibrate = commands.add_parser("calibrate", help="fit the speculation controller to this draft and target")
    calibrate.add_argument(
        "--prompts-file", help="JSONL (prompt / MT-Bench turns / ShareGPT) prompts (default: built-in templated ones)"
    )
    calibrate.add_argument("--limit", type=int, default=40, help="use only the first N prompts")
    calibrate.add_argument("--output", help="where to write the predictor (default: the draft's directory)")
    info = commands.add_parser("info", help="show the server's target model and limits")
    serve = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API (chat and text completions)")
    chat = commands.add_parser("chat", help="chat with the target in the terminal")
    for sub in (generate, calibrate, info, serve, chat):
        add_config_arguments(sub, EdgeConfig)
    args = parser.parse_args(argv)
    config = config_from_args(EdgeConfig, args)
    handlers = {"generate": cmd_generate, "calibrate": cmd_calibrate, "info": cmd_info}
    handler = {**handlers, "serve": cmd_serve, "chat": cmd_chat}[args.command]
    try:
        return handler(config, args)
    except grpc.RpcError as error:
        print(f"\nwisp-edge: server said {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nwisp-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
