"""Emulated devices: each one a thread that runs its sessions against the server through its own emulated link.

A speculative device is the real edge (`EdgeClient`, its controller and pipelining) with a `ReplayDrafter` in
place of the draft model, or, for small fleets (`wisp-bench run --devices real`), with the real draft model
running on this host. A centralized device asks the server to generate everything (`Generate`), through the
same emulated network: its first token pays the round trip, its stream the bandwidth.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from wisp_bench.channel import emulated_channel
from wisp_bench.network import Link
from wisp_bench.replay import Recording, ReplayDrafter
from wisp_bench.trace import RequestTrace
from wisp_bench.workload import ClosedLoopSession, Device
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import Slo
from wisp_edge.client import EdgeClient
from wisp_edge.controller import AcceptancePredictor, AdaptiveSpeculation, FixedLength
from wisp_edge.drafter import Drafter
from wisp_server.ngram import VLLM_NGRAM_EXAMPLE


@dataclass(frozen=True)
class Configuration:
    """One way of serving the same workload: the server's policy and what its devices do."""

    name: str
    policy: str  # the server's batch scheduling policy
    speculation: str | None  # the devices' mode: adaptive, fixed, or None (centralized: no drafting)
    pipeline: bool = False
    server_speculation: str = ""  # the server's own speculation for Generate (wisp-server --generate-speculation)
    pacing: str = "edge"  # who paces the devices' sessions (wisp-edge --pacing)
    branch: bool = True  # server-paced: second guesses streamed too (wisp-edge --branch)


CONFIGURATIONS = {
    c.name: c
    for c in (
        Configuration("wisp", "wisp", "adaptive", pipeline=True, pacing="auto"),  # the default edge
        Configuration("wisp-edge-paced", "wisp", "adaptive", pipeline=True),
        Configuration("wisp-paced", "wisp", "adaptive", pipeline=True, pacing="server"),
        # An ablation, run only when named: server-paced with one guess of each step in flight.
        Configuration("wisp-paced-no-branch", "wisp", "adaptive", pipeline=True, pacing="server", branch=False),
        Configuration("sled", "sled", "fixed"),  # static batches, a fixed length (SLED)
        Configuration("fcfs", "fcfs", "fixed"),
        Configuration("centralized", "fcfs", None),  # the target alone: continuous batching of Generate streams
        # The target alone with vLLM's n-gram speculation, at vLLM's documented example settings.
        Configuration("vllm-ngram", "fcfs", None, server_speculation=VLLM_NGRAM_EXAMPLE),
    )
}
ABLATIONS = ("wisp-paced-no-branch",)  # configurations a sweep runs only when named


@dataclass(frozen=True)
class DeviceRun:
    """Everything a device needs to run its sessions; shared by the fleet."""

    configuration: Configuration
    address: str
    prompt_ids: list[list[int]]  # the workload's prompts, encoded, by `Prompt.index`
    recordings: list[Recording]
    identity: pb.ModelIdentity  # the draft's, as the real edge would send it
    predictor: AcceptancePredictor | None  # the draft's calibrated controller (adaptive mode)
    draft_tokens: int
    max_new_tokens: int
    # The target's features the real draft reads (`features_read`): their bytes cross the link.
    features: tuple[int, ...] | None
    seed: int
    clock_zero: float  # the benchmark's time 0 (monotonic)
    # Real devices: a new drafter of the real draft model on this host (`drafter_factory`); None: replayed.
    real_drafter: Callable[[], Drafter] | None = field(default=None, compare=False)


def run_device(
    device: Device,
    sessions: list[ClosedLoopSession],
    slo: Slo,
    run: DeviceRun,
    stop: threading.Event,
    on_trace: Callable[[RequestTrace], None],
) -> None:
    """Runs ``sessions`` one after another (closed loop) until they are done or ``stop`` is set."""
    link = Link.for_device(device.profile, run.seed, device.device_id)
    channel = emulated_channel(run.address, link.uplink_delay, link.downlink_delay)
    client = None
    if run.configuration.speculation is not None:
        if run.real_drafter is not None:
            drafter = run.real_drafter()
        else:
            drafter = replay_drafter(run.recordings, device.profile.draft_seconds_per_token, run.features)
        client = edge_client(
            channel,
            drafter,
            run.identity,
            pb.DeviceInfo(device_id=device.device_id, kind=device.profile.name),
            run.predictor if run.configuration.speculation == "adaptive" else None,
            run.configuration.pipeline,
            run.configuration.pacing,
            run.configuration.branch,
        )
    stub = pb_grpc.WispStub(channel)
    try:
        for session in sessions:
            if stop.wait(session.think_seconds) or stop.is_set():
                return
            prompt = session.prompt
            trace = RequestTrace(
                config=run.configuration.name,
                device=device.device_id,
                device_class=device.profile.name,
                prompt_index=prompt.index,
                category=prompt.category,
                ttft_slo=slo.ttft_seconds,
                tpot_slo=slo.tpot_seconds,
                sent_at=time.monotonic() - run.clock_zero,
            )
            try:
                if client is None:
                    _generate(stub, run.prompt_ids[prompt.index], slo, run, trace)
                else:
                    _speculate(client, run.prompt_ids[prompt.index], slo, run, trace)
            except grpc.RpcError as error:
                trace.error = f"{error.code().name}: {error.details()}"
            on_trace(trace)
    finally:
        channel.close()


def replay_drafter(
    recordings: list[Recording], seconds_per_token: float, features: tuple[int, ...] | None
) -> ReplayDrafter:
    """A device's drafter that replays the recorded drafts at its profile's pace; it asks for the target's
    features (and ``features``' layers) where the real draft would (their bytes cross the link)."""
    drafter = ReplayDrafter(recordings, seconds_per_token)
    drafter.wants_features = features is not None
    drafter.feature_layers = tuple(features or ())
    return drafter


def edge_client(
    channel: grpc.Channel,
    drafter: Drafter,
    identity: pb.ModelIdentity,
    device: pb.DeviceInfo | None,
    predictor: AcceptancePredictor | None,
    pipeline: bool,
    pacing: str = "edge",
    branch: bool = True,
) -> EdgeClient:
    """The real edge with ``drafter``. With a ``predictor`` it is adaptive (its own copy of the predictor, as
    each real edge has) and lets the server decode where no draft pays, as WISP's edges do; without one it drafts
    a fixed length."""
    if predictor is None:
        return EdgeClient(channel, drafter, identity, device, FixedLength, pipeline)
    mode = AdaptiveSpeculation.mode_with(AcceptancePredictor(predictor.weights.copy()))
    return EdgeClient(
        channel, drafter, identity, device, mode, pipeline, server_decoding=True, pacing=pacing, branch=branch
    )


def _speculate(client: EdgeClient, prompt: list[int], slo: Slo, run: DeviceRun, trace: RequestTrace) -> None:
    def arrived(tokens: list[int]) -> None:
        trace.token_times += [time.monotonic() - run.clock_zero] * len(tokens)

    result = client.generate(
        prompt, max_new_tokens=run.max_new_tokens, draft_tokens=run.draft_tokens, slo=slo, on_tokens=arrived
    )
    stats = result.stats
    trace.rounds, trace.drafted, trace.sent, trace.accepted = stats.rounds, stats.drafted, stats.sent, stats.accepted
    trace.idle_seconds, trace.server_decoded = stats.idle_seconds, stats.server_decoded
    trace.branches, trace.branches_verified = stats.branches, stats.branches_verified
    trace.round_trip_seconds, trace.draft_seconds = stats.round_trip_seconds, stats.draft_seconds
    trace.queue_seconds, trace.verify_seconds = stats.server_queue_seconds, stats.server_verify_seconds


def _generate(stub: pb_grpc.WispStub, prompt: list[int], slo: Slo, run: DeviceRun, trace: RequestTrace) -> None:
    request = pb.GenerateRequest(
        prompt_token_ids=prompt, stop=pb.StopCondition(max_new_tokens=run.max_new_tokens), slo=slo.to_proto()
    )
    for response in stub.Generate(request):
        trace.token_times += [time.monotonic() - run.clock_zero] * len(response.token_ids)
