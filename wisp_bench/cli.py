"""`wisp-bench`: fleets of emulated devices against a live server; capacity and goodput per configuration.

wisp-bench run                                  # the default sweep, real regime: the real target on this host
wisp-bench run --regime modeled                 # the same devices against a modeled GPU (A100-80GB, a 32B target)
wisp-bench run --configs wisp centralized --sizes 1 2 4 8 16 --fleet laptop:1,jetson-orin-nano:1
wisp-bench run --devices real --sizes 1 2       # small fleets of real edges: the draft model runs on this host
wisp-bench record                               # only record the workload (the target's answers, the draft's chains)
wisp-bench validate                             # replayed devices against real edge processes, side by side
wisp-bench compare A.json B.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

from wisp_bench import metrics, report
from wisp_bench.devices import ABLATIONS, CONFIGURATIONS, Configuration, DeviceRun, run_device
from wisp_bench.record import RecordSettings, real_drafters, record
from wisp_bench.replay import Recording, synthetic_recordings, write_answers
from wisp_bench.server_metrics import during, scrape
from wisp_bench.trace import RequestTrace
from wisp_bench.workload import (
    ClosedLoopSession,
    Device,
    FleetSpec,
    SloSpec,
    closed_loop_plan,
    load_workload_prompts,
    open_loop_plan,
)
from wisp_common.config import DEFAULT_DRAFT, DEFAULT_TARGET

log = logging.getLogger("wisp_bench")
RESULTS = Path("wisp-bench-results")


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts",
        default=None,
        help="prompt file: JSONL, MT-Bench, ShareGPT or Spec-Bench "
        "(default: the MT-Bench questions shipped in wisp_bench/data)",
    )
    parser.add_argument("--limit", type=int, default=24, help="use the first N prompts (they are recorded once)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer at most")
    parser.add_argument("--draft-tokens", type=int, default=4, help="drafts per round: the most (adaptive) or always")
    parser.add_argument("--target-model", default=DEFAULT_TARGET)
    parser.add_argument("--draft-model", default=DEFAULT_DRAFT)
    parser.add_argument(
        "--dtype",
        default="float32",
        help="the target's and the draft's dtype while recording and "
        "serving (float32: greedy is exact, so replay is faithful)",
    )
    parser.add_argument("--engine", default="auto", choices=("auto", "vllm", "hf"), help="the real target's engine")
    parser.add_argument("--seed", type=int, default=0, help="prompts, think times and network jitter")


def main_parser() -> argparse.ArgumentParser:
    """wisp-bench's command line: run, record, validate and compare."""
    parser = argparse.ArgumentParser(
        prog="wisp-bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="sweep fleet sizes per configuration; JSON, PNG plots, markdown table")
    add_workload_arguments(run)
    run.add_argument(
        "--configs",
        nargs="+",
        default=[name for name in CONFIGURATIONS if name not in ABLATIONS],
        choices=list(CONFIGURATIONS),
        help=f"default: all but {', '.join(ABLATIONS)}",
    )
    run.add_argument(
        "--regime",
        choices=("real", "modeled"),
        default="real",
        help="real: the real target on this host; modeled: exact verdicts, a GPU cost model's time",
    )
    run.add_argument("--gpu-model", default="a100-80gb/qwen3-32b", help="modeled regime: the GPU and target")
    run.add_argument(
        "--devices",
        choices=("replayed", "real"),
        default="replayed",
        help="replayed: each device replays the recorded drafts at its profile's pace (no draft runs here); real: "
        "each runs the real draft model on this host's cores, at this host's pace (small fleets: they share the "
        "cores with the server); the network is the profile's either way",
    )
    run.add_argument(
        "--fleet", default="laptop:1", help="device classes and their mix, e.g. laptop:1,jetson-orin-nano:2"
    )
    run.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="fleet sizes (default: real 1 2 4 8; modeled 4 8 16 32)"
    )
    run.add_argument("--sessions-per-device", type=int, default=3, help="sessions each device runs, back to back")
    run.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=None,
        help="open loop instead of fleet sizes: arrivals per second, fleet-wide, each a new device of the --fleet "
        "mix (capacity is then the highest rate with >= 90%% SLO attainment)",
    )
    run.add_argument("--requests", type=int, default=24, help="open loop: arrivals per rate")
    run.add_argument(
        "--server-max-sessions",
        type=int,
        default=None,
        help="the server's admission limit (default: room for every session); below the load, sessions past it are "
        "refused and retried, as under sustained overload",
    )
    run.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="open loop: Gamma shape of the gaps between arrivals, as vllm bench serve's (1: Poisson; < 1 burstier)",
    )
    run.add_argument("--think", type=float, default=0.0, help="mean seconds a device pauses between sessions")
    run.add_argument(
        "--slo",
        default=None,
        help="TTFT/TPOT seconds per device class, e.g. default=2.0/0.1,jetson-orin-nano=3.0/0.15 (default: real "
        "2.0/0.25, the edge's own; modeled 1.0/0.1, 10 tokens per second per user, about 2.4 decode steps)",
    )
    run.add_argument(
        "--tpot-slos",
        type=float,
        nargs="+",
        default=None,
        help="TPOT SLOs (s) for the capacity curve (default: 0.5x to 3x the median TPOT of centralized serving at "
        "the smallest fleet, about a batch-1 decode step)",
    )
    run.add_argument(
        "--draft-accuracy",
        type=share,
        default=None,
        help="what-if: replace the recorded drafts by a synthetic draft that proposes the target's own token at "
        "this share of positions (0 to 1, seeded), to see what a better draft would buy; every result is labelled",
    )
    run.add_argument("--output-dir", type=Path, default=RESULTS)
    record_command = commands.add_parser("record", help="record the workload once (it is cached)")
    add_workload_arguments(record_command)
    validate = commands.add_parser("validate", help="replayed devices against real edge processes, same prompts")
    add_workload_arguments(validate)
    validate.add_argument("--edges", type=int, default=2, help="real edge processes, and as many replayed devices")
    validate.add_argument("--output-dir", type=Path, default=RESULTS)
    compare = commands.add_parser("compare", help="two runs' headline figures side by side, with ratios")
    compare.add_argument("a", type=Path)
    compare.add_argument("b", type=Path)
    parser.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "compare":
            report.print_compare(args.a, args.b)
            return 0
        if args.command == "run":
            args.sizes = args.sizes or ([1, 2, 4, 8] if args.regime == "real" else [4, 8, 16, 32])
            args.slo = args.slo or ("default=2.0/0.25" if args.regime == "real" else "default=1.0/0.1")
            if (problem := devices_problem(args)) is not None:
                print(f"wisp-bench: {problem}", file=sys.stderr)
                return 2
        # Real devices against the real target need no recordings: nothing is replayed, no verdict modeled.
        replays = args.command != "run" or args.devices == "replayed" or args.regime == "modeled"
        prompts, prompt_ids, recordings = prepare(args, replays)
        if args.command == "record":
            print(f"{len(recordings)} prompts recorded")
            return 0
        if args.command == "validate":
            return run_validation(args, prompts, prompt_ids, recordings)
        if args.draft_accuracy is not None:
            recordings = synthetic_recordings(recordings, args.draft_accuracy, args.seed, record_settings(args).depth)
        return sweep(args, prompts, prompt_ids, recordings)
    except KeyboardInterrupt:
        print("\nwisp-bench: interrupted", file=sys.stderr)
        return 130


def prepare(args: argparse.Namespace, recorded: bool = True):
    """The workload's prompts, encoded as the real edge would, and their recordings (none unless ``recorded``)."""
    from tqdm import tqdm

    from wisp_common.models import load_tokenizer
    from wisp_common.prompts import encode_prompt

    prompts = load_workload_prompts(args.prompts, args.limit)
    tokenizer = load_tokenizer(args.draft_model)
    prompt_ids = [encode_prompt(tokenizer, p.text, chat=True) for p in prompts]
    if not recorded:
        return prompts, prompt_ids, []
    settings = record_settings(args)
    with tqdm(total=len(prompts), desc="recording the workload", unit="prompt", leave=False) as bar:
        recordings = record(settings, prompt_ids, progress=lambda done, _: bar.update(done - bar.n))
    return prompts, prompt_ids, recordings


def devices_problem(args: argparse.Namespace) -> str | None:
    """Why the run's devices cannot be what it asks, if they cannot."""
    from wisp_common.eagle import is_eagle_model
    from wisp_common.models import resolve_model

    if args.devices == "real" and args.regime != "real" and is_eagle_model(resolve_model(args.draft_model)):
        return (
            f"--devices real needs --regime real with {args.draft_model}: it drafts from the target's features, "
            "which the modeled engine does not compute (or use --devices replayed)"
        )
    if args.devices == "real" and args.draft_accuracy is not None:
        return "--draft-accuracy replaces replayed drafts: use it with --devices replayed"
    return None


def share(text: str) -> float:
    """A command-line share: a number from 0 to 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def record_settings(args: argparse.Namespace) -> RecordSettings:
    return RecordSettings(
        args.target_model, args.draft_model, args.max_new_tokens, 2 * args.draft_tokens, args.dtype, args.engine
    )


def scaled_fleet(spec: FleetSpec, size: int) -> FleetSpec:
    """The spec's mix of classes at ``size`` devices (largest remainders), every class kept in order."""
    total = len(spec)
    shares = [(name, size * count / total) for name, count in spec.classes]
    counts = {name: int(share) for name, share in shares}
    for name, _ in sorted(shares, key=lambda s: s[1] - int(s[1]), reverse=True)[: size - sum(counts.values())]:
        counts[name] += 1
    return FleetSpec(tuple((n, counts[n]) for n, _ in spec.classes if counts[n]), spec.profiles)


def vllm_default_batch(args: argparse.Namespace) -> tuple[int, int]:
    """The batch limits `vllm serve` picks itself (max_num_seqs, max_num_batched_tokens; vLLM 0.32's
    `EngineArgs._set_default_max_num_seqs_and_batched_tokens_args`): a user serving the target alone keeps them."""
    if args.regime == "real":
        return 128, 2048  # the CPU platform's
    gpu = args.gpu_model.split("/")[0]
    return (1024, 8192) if gpu.startswith(("h100", "h200", "b200")) else (256, 2048)  # >= 70 GB but A100; else


def server_args(args: argparse.Namespace, configuration: Configuration, load: float, answers: Path) -> list[str]:
    common = ["--target-model", args.target_model, "--dtype", args.dtype, "--policy", configuration.policy]
    most = args.requests if args.rates else max(args.sizes)  # sessions that may be open at once
    admitted = args.server_max_sessions or most + 4
    common += ["--max-sessions", str(admitted), "--max-draft-tokens", str(2 * args.draft_tokens)]
    if configuration.server_speculation:
        common += ["--generate-speculation", configuration.server_speculation]
    if configuration.policy == "sled":  # a SLED user sizes the full batch to the fleet (open loop: unknown)
        common += ["--max-batch-sessions", str(16 if args.rates else min(int(load), 16))]
    else:  # the same server capacity for every other configuration: vLLM's own batch limits on this platform
        sessions, tokens = vllm_default_batch(args)
        common += ["--max-batch-sessions", str(sessions), "--max-batch-tokens", str(tokens)]
    if args.regime == "modeled":
        return [*common, "--engine", "modeled", "--gpu-model", args.gpu_model, "--answers", str(answers)]
    # The estimator's fits stay with the results: a sweep starts from none, whatever ran on this machine before.
    return [*common, "--engine", args.engine, "--estimator-cache", str(args.output_dir / "estimator-fits")]


def sweep(args, prompts, prompt_ids: list[list[int]], recordings: list[Recording]) -> int:
    from tqdm import tqdm

    from wisp_common.eagle import features_read
    from wisp_common.models import resolve_model
    from wisp_edge.controller import AcceptancePredictor
    from wisp_server.launcher import ServerProcess

    args.output_dir.mkdir(parents=True, exist_ok=True)
    answers = args.output_dir / "answers.jsonl"
    if recordings:
        write_answers(answers, recordings)
    fleet_spec = FleetSpec.parse(args.fleet)
    slos = SloSpec.parse(args.slo, known={name for name, _ in fleet_spec.classes})
    draft_path = resolve_model(args.draft_model)
    identity = draft_identity(args.draft_model)
    regime = regime_label(args)
    features = features_read(draft_path) if args.regime == "real" else None
    real_drafter = None
    if args.devices == "real":
        import torch

        torch.set_num_threads(1)  # one core per device's draft, as the laptop profile measured it
        real_drafter = real_drafters(record_settings(args))
    traces: dict[tuple[str, float], list[RequestTrace]] = {}
    server_figures: dict[str, dict] = {}  # per "config/load": what the server saw (batch sizes, estimator error)
    loads = args.rates or args.sizes
    per_config = len(loads) * args.requests if args.rates else sum(args.sizes) * args.sessions_per_device
    total = len(args.configs) * per_config
    bar = tqdm(total=total, desc="sessions", unit="session")
    server, running_args = None, None
    try:
        for name, load in interleaved(args.configs, loads):
            configuration = CONFIGURATIONS[name]
            wanted = server_args(args, configuration, load, answers)
            if wanted != running_args:  # a server is reused only where it was started exactly so
                if server is not None:
                    server.stop()
                bar.set_postfix_str(f"starting a server for {name}")
                server = ServerProcess(wanted, log_prefix=None)
                running_args = wanted
                warm_up(server.address, prompt_ids)
            bar.set_postfix_str(f"{name}, {load} arrivals/s" if args.rates else f"{name}, {load} devices")
            if args.rates:
                devices, plan = open_loop_devices(fleet_spec, prompts, load, args.requests, args.burstiness, args.seed)
            else:
                fleet = scaled_fleet(fleet_spec, load)
                devices = fleet.devices
                plan = closed_loop_plan(fleet, prompts, args.sessions_per_device, args.seed, args.think)
            run = DeviceRun(
                configuration=configuration,
                address=server.address,
                prompt_ids=prompt_ids,
                recordings=recordings,
                identity=identity,
                predictor=AcceptancePredictor.beside(draft_path),
                draft_tokens=args.draft_tokens,
                max_new_tokens=args.max_new_tokens,
                features=features,
                seed=args.seed,
                clock_zero=time.monotonic(),
                real_drafter=real_drafter,
            )
            before = scrape(server.metrics_port)
            traces[(name, load)] = run_fleet(devices, plan, slos, run, lambda _: bar.update())
            server_figures[f"{name}/{load}"] = during(before, scrape(server.metrics_port))
    finally:
        bar.close()
        if server is not None:
            server.stop()
    points = [(name, load) for name in args.configs for load in loads]  # the tables go by configuration
    traces = {point: traces[point] for point in points}
    server_figures = {f"{name}/{load}": server_figures[f"{name}/{load}"] for name, load in points}
    return write_results(args, regime, traces, server_figures)


def interleaved(configs: list[str], loads: list[float]) -> list[tuple[str, float]]:
    """The sweep's order: every configuration at one load before the next load, the configurations' order
    reversed from one load to the next. A shared machine's speed drifts over minutes (another tenant's jobs), so
    a ratio is taken between points run side by side, and a drift hits the first and last configuration alike."""
    return [(name, load) for i, load in enumerate(loads) for name in (configs if i % 2 == 0 else configs[::-1])]


def warm_up(address: str, prompt_ids: list[list[int]]) -> None:
    """One short session first: the first steps of a fresh engine are slower than the rest."""
    import grpc

    from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
    from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc

    stub = pb_grpc.WispStub(grpc.insecure_channel(address))
    for _ in stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt_ids[0], stop=pb.StopCondition(max_new_tokens=8))):
        pass


def server_table(server: dict[str, dict]) -> str:
    """What the server saw at each point: its batches, its estimator's error, its own time per round, and what an
    output token cost its host (stream messages, CPU)."""
    rows = [
        "| config/devices | batches | mean batch | mean verify ms | mean queue ms | estimator MAPE % "
        "| server overhead ms | refused | messages/token | server CPU ms/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point, f in server.items():
        cells = [
            f["batches"],
            f["mean_batch_size"],
            f["mean_verify_ms"],
            f["mean_queue_ms"],
            f["estimator_mape_percent"],
            f.get("mean_round_overhead_ms"),
            f.get("refused"),
            f.get("messages_per_token"),
            f.get("server_cpu_ms_per_token"),
        ]
        rows.append(f"| {point} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    return "\n".join(rows)


def open_loop_devices(fleet_spec: FleetSpec, prompts, rate: float, count: int, burstiness: float, seed: int):
    """Open loop: each arrival a device of its own (the fleet's mix), which waits for its arrival time, then sends."""
    devices, plan = [], {}
    for index, arrival in enumerate(open_loop_plan(fleet_spec, prompts, rate, count, burstiness, seed)):
        device = Device(f"{arrival.device.device_id}/arrival-{index}", arrival.device.profile)
        devices.append(device)
        plan[device.device_id] = [ClosedLoopSession(arrival.time, arrival.prompt)]
    return devices, plan


def run_fleet(devices: list[Device], plan, slos: SloSpec, run: DeviceRun, on_trace) -> list[RequestTrace]:
    """Every device in its own thread, all at once; returns their traces when the last session ends."""
    traces: list[RequestTrace] = []
    lock = threading.Lock()
    stop = threading.Event()

    def collect(trace: RequestTrace) -> None:
        with lock:
            traces.append(trace)
        on_trace(trace)

    threads = [
        threading.Thread(
            target=run_device,
            args=(device, plan[device.device_id], slos.for_class(device.profile.name), run, stop, collect),
            daemon=True,
        )
        for device in devices
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:
        stop.set()
    return traces


def run_validation(args, prompts, prompt_ids: list[list[int]], recordings: list[Recording]) -> int:
    """Real edges and replayed devices side by side against one real server; a table and a JSON."""
    import tempfile

    from wisp_bench.profiles import profile
    from wisp_bench.validate import validate
    from wisp_common.eagle import features_read
    from wisp_common.models import resolve_model
    from wisp_edge.controller import AcceptancePredictor
    from wisp_server.launcher import ServerProcess

    draft_path = resolve_model(args.draft_model)
    server = ["--target-model", args.target_model, "--dtype", args.dtype, "--engine", args.engine]
    server += ["--max-draft-tokens", str(2 * args.draft_tokens)]
    with ServerProcess(server, log_prefix=None) as process, tempfile.TemporaryDirectory() as workdir:
        warm_up(process.address, prompt_ids)
        comparisons = validate(
            process.address,
            [p.text for p in prompts],
            prompt_ids,
            recordings,
            draft_identity(args.draft_model),
            args.draft_model,
            AcceptancePredictor.beside(draft_path),
            args.draft_tokens,
            args.max_new_tokens,
            profile("laptop").draft_seconds_per_token,  # this host is the laptop profile's
            features_read(draft_path),
            Path(workdir),
            edges=args.edges,
        )
    rows = [c.summary() for c in comparisons]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(args.output_dir / "validation.json", {"command": " ".join(sys.argv), "comparisons": rows})
    print(
        "| mode | prompts | identical (tokens, rounds, accepted) | same tokens | acceptance real / replayed | "
        "tokens per round real / replayed | difference |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['prompts']} | {r['identical']} | {r['same_tokens']} | "
            f"{r['acceptance_real']:.3f} / {r['acceptance_replayed']:.3f} | "
            f"{r['tokens_per_round_real']:.3f} / {r['tokens_per_round_replayed']:.3f} | "
            f"{100 * r['tokens_per_round_difference']:+.1f}% |"
        )
    return 0


def draft_identity(draft_model: str):
    """What the real edge tells the server about its draft."""
    from wisp_common.identity import draft_identity
    from wisp_common.models import load_tokenizer

    return draft_identity(draft_model, load_tokenizer(draft_model))


def regime_label(args: argparse.Namespace) -> str:
    """Every result says which regime it comes from."""
    from wisp_common.models import hardware_name

    devices = ", real edge devices (the draft on this host)" if args.devices == "real" else ""
    if args.draft_accuracy is not None:
        accuracy = f"{args.draft_accuracy:.0%}"
        devices += f"; what-if: a synthetic draft right at {accuracy} of positions, not {args.draft_model}"
    if args.regime == "modeled":
        return f"modeled GPU {args.gpu_model} (verdicts of {args.target_model}){devices}"
    return f"real: {args.target_model} {args.dtype}, {hardware_name()}{devices}"


def default_tpot_slos(by_config: dict[str, dict[int, list[RequestTrace]]], smallest: int) -> list[float]:
    """From below a batch-1 decode step (centralized serving's median TPOT at the smallest fleet) to 3x it."""
    alone = [metrics.tpot(t) for t in by_config.get("centralized", {}).get(smallest, []) if t.output_tokens >= 2]
    step = sorted(alone)[len(alone) // 2] if alone else 0.1
    return [round(step * f, 4) for f in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)]


def write_results(args, regime: str, traces: dict[tuple[str, int], list[RequestTrace]], server: dict) -> int:
    summaries = [metrics.summarize(group, load=size, config=name) for (name, size), group in traces.items()]
    by_config: dict[str, dict[int, list[RequestTrace]]] = {}
    for (name, size), group in traces.items():
        by_config.setdefault(name, {})[size] = group
    capacity = {
        name: metrics.capacity({s: metrics.attainment(g) for s, g in groups.items()})
        for name, groups in by_config.items()
    }
    loads = args.rates or args.sizes
    tpot_slos = args.tpot_slos or default_tpot_slos(by_config, min(loads))
    curves = {name: metrics.capacity_curve(groups, tpot_slos) for name, groups in by_config.items()}
    meta = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
        "server": server,
    }
    payload = report.make_payload(regime, summaries, traces, capacity=capacity, capacity_curves=curves, meta=meta)
    out = args.output_dir
    report.write_json(out / "results.json", payload)
    label, unit = ("arrival rate (requests/s)", "arrivals/s") if args.rates else ("fleet size (devices)", "devices")
    report.plot_goodput(summaries, out / "goodput.png", regime, load_label=label)
    report.plot_slo_attainment(summaries, out / "slo_attainment.png", regime, load_label=label)
    largest = max(loads)
    report.plot_latency_cdfs(
        {n: traces[(n, largest)] for n in by_config}, out / "latency_cdf.png", regime, load=largest
    )
    operating = SloSpec.parse(args.slo).default.tpot_seconds  # the SLO the run was judged by: a user's pick
    report.plot_capacity_curve(
        curves,
        out / "capacity_vs_tpot_slo.png",
        regime,
        operating_slo=operating,
        load_label=f"capacity ({unit} at >=90% SLO attainment)",
    )
    table = report.markdown_table(summaries) + "\n\n" + server_table(server)
    if anatomy := report.anatomy_table(summaries):
        table += "\n\n" + anatomy
    (out / "summary.md").write_text(
        f"{regime}\n\n{table}\n\ncapacity ({unit} at >= 90% SLO attainment): {json.dumps(capacity)}\n"
    )
    print(f"\n{regime}\n\n{table}\n\ncapacity: {capacity}\nresults in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
