"""How good a draft is for its target, on the MT-Bench first turns, measured three ways in one run:

1. agreement: the target answers every question greedily (96 tokens) through
   WISP's engine, with its features; the draft, fed the target's features and
   tokens (teacher forcing), predicts each answer token. The share it gets
   right is its greedy agreement. Also reported: the same with the feature
   before each prediction the draft's own (its second draft token, step 2),
   and the first token's where the edge's prompt lookup overrides it.
2. tokens per round: real edge sessions through a real server (vllm engine)
   at fixed speculation lengths, several sessions at once: tokens committed
   per verification round, the figure that decides the server's capacity.
   The edge as shipped (draft and prompt lookup) and the draft alone, in
   turns against the same server.
3. cost: the draft's and the target's time per token at batch 1 with a KV
   cache, in this process, in alternating turns; and each one's tokens/s.
4. sources: tokens per round by drafting source, per category, through the
   same server, rounds capped at 4 drafts: the draft alone, the n-gram prompt
   lookup alone, the suffix index alone, the edge as shipped (draft and
   lookup), the draft with the suffix index, and all three. The prompts: the
   tasks beyond chat (translation, summarization, passage QA, math,
   retrieval-augmented answers) and MT-Bench as one more category. Each pass
   starts every device with an empty history, and a history never holds an
   answer to the prompt being answered.
5. low load (only when asked for): one session at a time through the same
   server, the edge as shipped (draft, prompt lookup, pipelining) at each
   fixed length and with the adaptive controller, in turns prompt by prompt:
   tokens per second of its wall time (the edge's and the server's time, all
   of it), the measure by which the controller must match the best length.
6. sampled (only when asked for): tokens per round and per second of
   sampled sessions at each of --temperatures, the draft and prompt lookup at
   a fixed length (--sampled-length; 0: none) and with the speculation
   controller, with the drafts' probabilities sent (the server accepts a
   draft with min(1, p/q)) and without (point masses: p).

    python -m benchmarks.draft_quality                     # the default pair
    python -m benchmarks.draft_quality --draft-model DIR --server-prompts 20
    python -m benchmarks.draft_quality --stages sources --per-category 4
    python -m benchmarks.draft_quality --stages sampled --server-prompts 16 --answer-tokens 64
    python -m benchmarks.draft_quality --stages lowload --server-prompts 16
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import MT_BENCH, add_common_options
from benchmarks.report import print_table, save_plot, write_json
from wisp_bench import BEYOND_CHAT

VARIANTS = {  # result key: (legend, colour)
    "tokens_per_round": ("draft + prompt lookup (the edge's default)", "tab:blue"),
    "tokens_per_round_draft_alone": ("draft alone", "tab:gray"),
}
STAGES = ("agreement", "rounds", "cost", "sources", "lowload", "sampled")
SOURCES = {  # stage 4's variants: (draft, prompt lookup, suffix index)
    "draft": (True, False, False),
    "lookup": (False, True, False),
    "suffix": (False, False, True),
    "draft+lookup": (True, True, False),
    "draft+suffix": (True, False, True),
    "draft+lookup+suffix": (True, True, True),
}
SOURCE_LENGTH = 4  # stage 4's rounds: at most this many drafts


def target_answers(
    args, prompts: list[list[int]], eos: int | None, engine: str = "vllm", feature_layers: tuple[int, ...] = ()
):
    """The target's greedy answers and features (and ``feature_layers``' outputs), through the server's ``engine``
    (vllm, as the server's default)."""
    from wisp_common.config import DistillConfig
    from wisp_distill import data

    config = DistillConfig(target_model=args.target_model, engine=engine, dtype=args.dtype, concurrency=len(prompts))
    target = data.target_engine(config, max(map(len, prompts)) + args.answer_tokens + 1, feature_layers)
    indexed = dict(enumerate(prompts))
    samples = dict(data.answer(target, indexed, args.answer_tokens, len(prompts), eos, feature_layers=feature_layers))
    return [samples[i] for i in range(len(prompts))]


def agreement(draft_model, samples) -> list[float]:
    """From the target's features, and from the draft's own prediction of the feature before (step 2)."""
    from wisp_distill import train

    batches = train.make_batches(samples, 4096, random.Random(0))
    return train.evaluate(draft_model, batches, "cpu", 1.0, steps=2)


def agreement_with_lookup(draft_model, samples, lookup) -> float:
    """Teacher-forced first-token agreement where the edge's prompt lookup overrides the unsure drafts."""
    from wisp_distill import train

    hits = total = 0
    with torch.inference_mode():
        for sample in samples:
            batch = train.collate([sample])
            _, logits = next(train.unrolled(draft_model, batch.features.float(), batch.tokens, 1))
            top1, index = logits[0].softmax(-1).max(-1)
            tokens = sample.tokens.tolist()
            for i in (batch.labels[0] >= 0).nonzero().flatten().tolist():  # predicting token i + 2
                picked = lookup.override(float(top1[i]), tokens[: i + 2])
                picked = int(draft_model.head_ids[index[i]]) if picked is None else picked
                hits += picked == int(batch.labels[0, i])
                total += 1
    return hits / max(total, 1)


def tokens_per_round(
    args,
    prompts: list[list[int]],
    make_drafter,
    length: int | None,
    categories: list[str] | None = None,
    sampling=None,
) -> dict:
    """Sessions through a real server, ``concurrency`` at once (each device with its own drafter); ``length``
    None: the adaptive controller. With ``categories`` (one per prompt), tokens and rounds per category too.
    ``sampling`` (a SamplingParams): the sessions' sampling, greedy if None."""
    import grpc

    from wisp_common.models import load_tokenizer, resolve_model, tokenizer_fingerprint
    from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
    from wisp_common.request import SamplingParams
    from wisp_edge.client import EdgeClient
    from wisp_edge.controller import AcceptancePredictor, AdaptiveSpeculation, FixedLength

    tokenizer = load_tokenizer(args.draft_model)
    identity = pb.ModelIdentity(name=args.draft_model, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    if length:
        speculation = FixedLength
    else:
        speculation = AdaptiveSpeculation.mode_with(AcceptancePredictor.beside(resolve_model(args.draft_model)))
    work = list(zip(prompts, categories or [""] * len(prompts)))
    totals = {"tokens": 0, "rounds": 0, "sent": 0, "accepted": 0}
    by_category: dict[str, dict[str, int]] = defaultdict(lambda: {"tokens": 0, "rounds": 0})
    lock = threading.Lock()

    def device() -> None:
        client = EdgeClient(grpc.insecure_channel(args.server), make_drafter(), identity, speculation=speculation)
        while True:
            with lock:
                if not work:
                    return
                prompt, category = work.pop()
            stats = client.generate(
                prompt,
                max_new_tokens=args.answer_tokens,
                draft_tokens=length or 8,
                sampling=sampling or SamplingParams(),
            ).stats
            with lock:
                for key, value in (("tokens", stats.generated), ("rounds", stats.rounds)):
                    totals[key] += value
                    by_category[category][key] += value
                totals["sent"] += stats.sent
                totals["accepted"] += stats.accepted

    started = time.monotonic()
    threads = [threading.Thread(target=device) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = {**totals, "wall_seconds": time.monotonic() - started}
    return {**result, "by_category": dict(by_category)} if categories else result


def low_load(args, prompts: list[list[int]], make_drafter) -> dict:
    """Stage 5: one session at a time, each speculation mode in turn on every prompt (the order rotating, as
    this machine's speed drifts): tokens per second of wall time, and tokens per round, by mode."""
    import grpc

    from wisp_common.config import EdgeConfig
    from wisp_common.identity import draft_identity
    from wisp_common.models import load_tokenizer, resolve_model
    from wisp_edge.client import EdgeClient
    from wisp_edge.controller import AcceptancePredictor, AdaptiveSpeculation, FixedLength

    identity = draft_identity(args.draft_model, load_tokenizer(args.draft_model))  # as the edge sends it
    channel = grpc.insecure_channel(args.server)
    shipped = EdgeConfig()  # the edge's defaults: pipelining on, at most `draft_tokens` drafts a round
    modes = {
        str(n): (EdgeClient(channel, make_drafter(), identity, speculation=FixedLength, pipeline=shipped.pipeline), n)
        for n in args.lengths
    }
    adaptive = AdaptiveSpeculation.mode_with(AcceptancePredictor.beside(resolve_model(args.draft_model)))
    client = EdgeClient(
        channel,
        make_drafter(),
        identity,
        speculation=adaptive,
        pipeline=shipped.pipeline,
        server_decoding=shipped.server_decoding,
    )
    modes["adaptive"] = (client, shipped.draft_tokens)
    totals = {name: {"tokens": 0, "rounds": 0, "seconds": 0.0} for name in modes}
    names = list(modes)
    for index, prompt in enumerate(prompts):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            client, length = modes[name]
            started = time.monotonic()
            stats = client.generate(prompt, max_new_tokens=args.answer_tokens, draft_tokens=length).stats
            totals[name]["seconds"] += time.monotonic() - started
            totals[name]["tokens"] += stats.generated
            totals[name]["rounds"] += stats.rounds
        print(f"  {index + 1}/{len(prompts)} prompts", file=sys.stderr)
    for figures in totals.values():
        figures["tokens_per_second"] = figures["tokens"] / figures["seconds"]
        figures["tokens_per_round"] = figures["tokens"] / max(figures["rounds"], 1)
    return totals


def plot_low_load(table: dict) -> Path:
    def draw(axes) -> None:
        names = list(table)
        colors = ["tab:blue" if name == "adaptive" else "tab:gray" for name in names]
        axes.bar(names, [table[n]["tokens_per_second"] for n in names], color=colors)
        best = max(table[n]["tokens_per_second"] for n in names if n != "adaptive")
        axes.axhline(best, color="tab:red", linestyle="--", label="best fixed length")
        axes.set(title="one session at a time", xlabel="speculation length", ylabel="tokens / s of wall time")
        axes.legend(loc="lower right")

    return save_plot("draft_quality_lowload", draw)


def source_prompts(tokenizer, files: list[str], per_category: int) -> tuple[list[list[int]], list[str]]:
    """Up to ``per_category`` prompts of each category, evenly spread over it; a file whose records carry no
    category, or MT-Bench (whose categories are all chat), is one category named after the file."""
    from wisp_bench.workload import load_workload_prompts
    from wisp_common.prompts import encode_prompt

    groups: dict[str, list[str]] = defaultdict(list)
    for file in files:
        for prompt in load_workload_prompts(file):
            category = Path(file).stem if Path(file) == MT_BENCH or not prompt.category else prompt.category
            groups[category].append(prompt.text)
    encoded, categories = [], []
    for category, texts in groups.items():
        count = min(per_category, len(texts))
        for i in range(count):
            encoded.append(encode_prompt(tokenizer, texts[i * len(texts) // count], chat=True))
            categories.append(category)
    return encoded, categories


def source_drafters(args, lookup, names: list[str]) -> dict:
    """Stage 4's drafter factories: each call makes a device's drafter, with an empty history."""
    from wisp_edge.draft_loader import drafter_factory
    from wisp_edge.drafter import CopyDrafter
    from wisp_edge.suffix import SuffixDecoding

    suffix = SuffixDecoding(max_tokens=SOURCE_LENGTH, forget_same_prompt=True)
    factories = {}
    for name in names:
        draft, with_lookup, with_suffix = SOURCES[name]
        lookup_of, suffix_of = (lookup if with_lookup else None), (suffix if with_suffix else None)
        if draft:
            factories[name] = drafter_factory(args.draft_model, lookup=lookup_of, suffix=suffix_of)
        else:
            factories[name] = lambda lookup_of=lookup_of, suffix_of=suffix_of: CopyDrafter(
                lookup=lookup_of, suffix=None if suffix_of is None else suffix_of.decoder()
            )
    return factories


def by_source(args, tokenizer, lookup) -> dict:
    """Stage 4: tokens per round per category for each drafting source, through the server at ``args.server``."""
    prompts, categories = source_prompts(tokenizer, args.source_prompts, args.per_category)
    result: dict = {"length": SOURCE_LENGTH, "prompts": len(prompts), "tokens_per_round": {}, "runs": {}}
    for name, make_drafter in source_drafters(args, lookup, args.sources).items():
        totals = tokens_per_round(args, prompts, make_drafter, SOURCE_LENGTH, categories)
        per_category = {k: v["tokens"] / v["rounds"] for k, v in sorted(totals["by_category"].items())}
        result["tokens_per_round"][name] = {**per_category, "all": totals["tokens"] / totals["rounds"]}
        result["runs"][name] = totals
        print(f"  {name}: {result['tokens_per_round'][name]['all']:.2f} tokens/round", file=sys.stderr)
    return result


def sampled(args, prompts: list[list[int]], lookup) -> dict:
    """Stage 6: sampled sessions, the drafts' probabilities sent or not, at the fixed length and with the
    controller, per temperature: tokens per round, and tokens per second of the run's wall time (the controller
    follows the server's goodput-optimal length, so it may commit fewer tokens per round in less time)."""
    from wisp_common.request import SamplingParams
    from wisp_edge.draft_loader import drafter_factory

    modes = {f"length {args.sampled_length}": args.sampled_length} if args.sampled_length else {}
    modes["controller"] = None
    result: dict = {"prompts": len(prompts), "tokens_per_round": {}, "tokens_per_second": {}, "runs": {}}
    for temperature in args.temperatures:
        sampling = SamplingParams(temperature=temperature)
        for name, with_q in (("with probabilities", True), ("point masses", False)):
            make_drafter = drafter_factory(args.draft_model, sampling, lookup=lookup, draft_probabilities=with_q)
            for mode, length in modes.items():
                totals = tokens_per_round(args, prompts, make_drafter, length, sampling=sampling)
                key = f"{mode}, {name}"
                result["tokens_per_round"].setdefault(str(temperature), {})[key] = totals["tokens"] / totals["rounds"]
                result["tokens_per_second"].setdefault(str(temperature), {})[key] = (
                    totals["tokens"] / totals["wall_seconds"]
                )
                result["runs"][f"{temperature}/{key}"] = totals
                result["acceptance"] = {
                    **result.get("acceptance", {}),
                    f"{temperature}/{key}": totals["accepted"] / max(totals["sent"], 1),
                }
                print(
                    f"  temperature {temperature}, {key}: {totals['tokens'] / totals['rounds']:.2f} tokens/round, "
                    f"{totals['tokens'] / totals['wall_seconds']:.1f} tokens/s",
                    file=sys.stderr,
                )
    return result


def cost(args, prompt: list[int], target, draft_model, lookup) -> dict[str, float]:
    """Median seconds per token at batch 1 with a KV cache: target decode steps vs draft steps (with the prompt
    lookup, and alone), in turns."""
    from transformers import DynamicCache

    from wisp_common.features import computed_feature_rows
    from wisp_edge.eagle import EagleDrafter

    with torch.inference_mode():
        features = computed_feature_rows(target, prompt, draft_model.feature_layers)
    times: dict[str, list[float]] = {"target": [], "draft": [], "draft_alone": []}
    for _ in range(args.cost_turns):
        cache = DynamicCache()
        with torch.inference_mode():
            logits = target(input_ids=torch.tensor([prompt]), past_key_values=cache).logits[0, -1]
            for _ in range(args.cost_tokens):
                start = time.perf_counter()
                logits = target(input_ids=logits.argmax().view(1, 1), past_key_values=cache).logits[0, -1]
                times["target"].append(time.perf_counter() - start)
        for name, with_lookup in (("draft", lookup), ("draft_alone", None)):
            drafter = EagleDrafter(draft_model, lookup=with_lookup)
            drafter.start(prompt[:-1])
            drafter.commit(0, prompt[-1], features[:-1])
            drafter.draft_one()  # the pass over the prompt's features, not a per-token cost
            for _ in range(args.cost_tokens):
                start = time.perf_counter()
                drafter.draft_one()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def plot(result: dict) -> Path:
    def draw(left, right) -> None:
        labels = list(result["tokens_per_round"])
        width = 0.4
        for shift, (variant, (legend, color)) in zip((-width / 2, width / 2), VARIANTS.items()):
            values = [result[variant].get(k, 0.0) for k in labels]
            left.bar([i + shift for i in range(len(labels))], values, width, color=color, label=legend)
        left.set_xticks(range(len(labels)), labels)
        left.axhline(1.8, color="tab:red", linestyle="--", label="bar: 1.8")
        left.set(
            title=f"tokens per verification round (agreement {result['agreement']:.3f})",
            xlabel="speculation length",
            ylabel="tokens / round",
        )
        left.legend(loc="lower right")
        names = ["target", "draft", "draft_alone"]
        speeds = [1 / result["seconds_per_token"][n] for n in names]
        right.bar(["target", "draft + lookup", "draft alone"], speeds, color=["tab:gray", "tab:green", "tab:olive"])
        right.set(
            title=f"batch-1 speed: draft/target cost {result['cost_ratio']:.3f}",
            ylabel="tokens / s",
        )

    return save_plot("draft_quality", draw, ncols=2, figsize=(10, 4))


def print_sources(sources: dict) -> None:
    """Stage 4's table: a row per category, a column per source."""
    table = sources["tokens_per_round"]
    names = list(table)
    categories = [c for c in next(iter(table.values())) if c != "all"] + ["all"]
    rows = [[category, *[round(table[name][category], 2) for name in names]] for category in categories]
    print_table(["tokens/round (max 4 drafts)", *names], rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.draft_quality", description=__doc__.splitlines()[0])
    add_common_options(
        parser,
        draft_model=True,
        dtype="float32",
        dtype_help="the target's dtype, in the server and for agreement",
        prompts_flag="--prompts",
        answer_tokens=True,
    )
    parser.add_argument("--server-prompts", type=int, default=80, help="prompts answered through the server per run")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2, 3, 4], help="fixed speculation lengths")
    parser.add_argument("--concurrency", type=int, default=8, help="edge sessions at once")
    parser.add_argument("--cost-tokens", type=int, default=32)
    parser.add_argument("--cost-turns", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(STAGES[:4]),
        help="agreement, rounds and cost run together; lowload and sampled run only when named",
    )
    parser.add_argument("--source-prompts", nargs="+", default=[str(BEYOND_CHAT), str(MT_BENCH)], help="stage 4")
    parser.add_argument("--per-category", type=int, default=10, help="stage 4: prompts per category")
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES), help="stage 4")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0], help="stage 6 (sampled)")
    parser.add_argument(
        "--sampled-length", type=int, default=4, help="stage 6: fixed drafts per round, beside the controller (0: none)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classic = set(STAGES[:3]) <= set(args.stages)
    if not classic and set(STAGES[:3]) & set(args.stages):
        raise SystemExit("agreement, rounds and cost run together")

    from wisp_common.config import EdgeConfig
    from wisp_common.models import load_causal_lm, load_tokenizer
    from wisp_common.prompts import encode_prompt, load_prompts
    from wisp_edge.draft_loader import drafter_factory
    from wisp_edge.eagle import EagleDrafter
    from wisp_edge.lookup import PromptLookup
    from wisp_server.launcher import ServerProcess

    tokenizer = load_tokenizer(args.target_model)
    prompts = [encode_prompt(tokenizer, text, chat=True) for text in load_prompts(args.prompts)]
    lookup = PromptLookup.of(EdgeConfig())  # the edge's default
    drafters = {
        "tokens_per_round": drafter_factory(args.draft_model, lookup=lookup),
        "tokens_per_round_draft_alone": drafter_factory(args.draft_model),
    }
    drafter = drafters["tokens_per_round"]()
    if not isinstance(drafter, EagleDrafter):
        raise SystemExit(f"{args.draft_model} is not a feature-conditioned draft (made by wisp-distill)")
    draft_model = drafter.model

    if classic:
        print(
            f"1/4 agreement: the target answers {len(prompts)} prompts ({args.answer_tokens} tokens)", file=sys.stderr
        )
        samples = target_answers(args, prompts, tokenizer.eos_token_id, feature_layers=draft_model.feature_layers)
        rate, own_rate = agreement(draft_model, samples)
        lookup_rate = agreement_with_lookup(draft_model, samples, lookup) if lookup else rate

    rounds: dict[str, dict[str, float]] = {variant: {} for variant in VARIANTS}
    details: dict[str, dict] = {}
    sources: dict = {}
    server_args = ["--target-model", args.target_model, "--engine", "vllm", "--dtype", args.dtype]
    with ServerProcess([*server_args, "--max-draft-tokens", "8"], log_prefix=None) as server:
        args.server = server.address
        if classic:
            print("2/4 tokens per round through a real server, with the prompt lookup and without", file=sys.stderr)
        for length in [*args.lengths, None] if classic else []:
            name = str(length) if length else "adaptive"
            for variant, make_drafter in drafters.items():
                if length is None and variant != "tokens_per_round":
                    continue  # the controller is calibrated for the edge as shipped
                totals = tokens_per_round(args, prompts[: args.server_prompts], make_drafter, length)
                rounds[variant][name] = totals["tokens"] / totals["rounds"]
                details[f"{variant}/{name}"] = totals
            alone = rounds["tokens_per_round_draft_alone"].get(name)
            print(
                f"  length {name}: {rounds['tokens_per_round'][name]:.2f} tokens/round"
                + (f" (draft alone {alone:.2f})" if alone else ""),
                file=sys.stderr,
            )
        if "sources" in args.stages:
            print(f"4/4 tokens per round by source and category (at most {SOURCE_LENGTH} drafts)", file=sys.stderr)
            sources = by_source(args, tokenizer, lookup)
        if "lowload" in args.stages:
            print("lowload: one session at a time, fixed lengths against the adaptive controller", file=sys.stderr)
            lowload = low_load(args, prompts[: args.server_prompts], drafters["tokens_per_round"])
        if "sampled" in args.stages:
            print(f"sampled: sampled sessions, temperatures {args.temperatures}", file=sys.stderr)
            sampled_rounds = sampled(args, prompts[: args.server_prompts], lookup)
    if sources:
        print_sources(sources)
    if "lowload" in args.stages:
        print_table(
            ["speculation", "tokens/s (one session)", "tokens/round"],
            [[n, round(v["tokens_per_second"], 2), round(v["tokens_per_round"], 2)] for n, v in lowload.items()],
        )
        print(f"wrote {write_json('draft_quality_lowload', {'lowload': lowload, 'args': vars(args)})}")
        print(f"wrote {plot_low_load(lowload)}")
    if "sampled" in args.stages:
        rates = sampled_rounds["tokens_per_second"]
        print_table(
            ["temperature", "speculation, drafts sent as", "tokens/round", "tokens/s"],
            [
                [t, key, round(per_round, 2), round(rates[t][key], 1)]
                for t, row in sampled_rounds["tokens_per_round"].items()
                for key, per_round in row.items()
            ],
        )
        print(f"wrote {write_json('draft_quality_sampled', {'sampled': sampled_rounds, 'args': vars(args)})}")
    if not classic:
        if sources:
            print(f"wrote {write_json('draft_quality_sources', {'sources': sources, 'args': vars(args)})}")
        return 0

    print("3/4 cost per token at batch 1", file=sys.stderr)
    target = load_causal_lm(args.target_model, "float32")
    seconds = cost(args, prompts[0], target, draft_model, lookup)
    result = {
        "target_model": args.target_model,
        "draft_model": args.draft_model,
        "lookup": vars(lookup) if lookup else None,
        "agreement": rate,
        "agreement_own_features": own_rate,
        "agreement_with_lookup": lookup_rate,
        **rounds,
        "server_runs": details,
        "seconds_per_token": seconds,
        "tokens_per_second": {name: 1 / s for name, s in seconds.items()},
        "cost_ratio": seconds["draft"] / seconds["target"],
        "cost_ratio_draft_alone": seconds["draft_alone"] / seconds["target"],
        # what each committed token's verdict carries back for the draft (float16 rows; more with feature layers)
        "feature_layers": list(draft_model.feature_layers),
        "feature_bytes_per_token": 2 * draft_model.feature_width,
        "sources": sources,
        "args": vars(args),
    }
    with_lookup, alone_rounds = rounds["tokens_per_round"], rounds["tokens_per_round_draft_alone"]
    best = max(with_lookup[str(n)] for n in args.lengths)
    print_table(
        ["metric", "value", "draft alone", "bar"],
        [
            ["greedy agreement (teacher forcing, MT-Bench)", round(lookup_rate, 3), round(rate, 3), ">= 0.45"],
            ["the same, from its own predicted feature (step 2)", "", round(own_rate, 3), ""],
            *[
                [f"tokens/round, length {k}", round(v, 2), round(alone_rounds[k], 2), ">= 1.8 (best of 2-4)"]
                for k, v in with_lookup.items()
                if k in alone_rounds
            ],
            *[
                ["tokens/round, the speculation controller (max 8)", round(v, 2), "", ""]
                for k, v in with_lookup.items()
                if k not in alone_rounds
            ],
            [
                "draft / target time per token (batch 1)",
                round(result["cost_ratio"], 3),
                round(result["cost_ratio_draft_alone"], 3),
                "<= 0.15",
            ],
            ["target tokens/s (batch 1, HF)", round(1 / seconds["target"], 1), "", ""],
            ["draft tokens/s (batch 1)", round(1 / seconds["draft"], 1), round(1 / seconds["draft_alone"], 1), ""],
            ["target features per committed token (bytes)", result["feature_bytes_per_token"], "", ""],
        ],
    )
    print(f"best fixed length: {best:.2f} tokens/round")
    png = plot(result)
    print(f"wrote {write_json('draft_quality', result)} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
