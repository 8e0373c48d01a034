"""`wisp-bench record`: the target's greedy answers and the draft's chains along them, computed once and cached.

The target answers through the server's own engine (vLLM where installed), with its features, exactly as a
session would see them; the real drafter (with the edge's prompt lookup) then walks each answer. The result
is cached under ``$WISP_CACHE_DIR/bench`` by everything it depends on, so a benchmark pays for it once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wisp_bench.replay import Recording, load_recordings, record_chains, recording_key, save_recordings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordSettings:
    target_model: str
    draft_model: str
    max_new_tokens: int
    depth: int  # drafts recorded per point: a round's most, plus what pipelining may add
    dtype: str = "float32"
    engine: str = "auto"
    lookup_ngram: int = 4
    lookup_below: float = 0.5
    signals_format: int = 2  # 2: each draft's signals name its runner-up (for server-paced branches)


def cache_path(settings: RecordSettings, prompts: list[list[int]]) -> Path:
    from wisp_common.models import cache_dir

    key = recording_key(settings=vars(settings), prompts=prompts, draft=weights_digest(settings.draft_model))
    return cache_dir().parent / "bench" / f"recordings-{key}.json"


def weights_digest(model: str) -> str:
    """A hash of a draft's trained weights and config (tens of MB at most; not the target's embedding it carries):
    a draft retrained under the same name, as the shipped one is, is recorded anew."""
    import hashlib

    from wisp_common.models import resolve_model

    path, digest = Path(resolve_model(model)), hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    return digest.hexdigest()[:16]


def real_drafters(settings: RecordSettings) -> Callable:
    """The real drafter that recordings replay, loaded once: a new one per call (the draft model with the edge's
    prompt lookup)."""
    from wisp_common.config import EdgeConfig
    from wisp_edge.draft_loader import drafter_factory
    from wisp_edge.lookup import PromptLookup

    lookup = PromptLookup.of(EdgeConfig(lookup_ngram=settings.lookup_ngram, lookup_below=settings.lookup_below))
    return drafter_factory(settings.draft_model, dtype=settings.dtype, lookup=lookup)


def record(settings: RecordSettings, prompts: list[list[int]], progress=None) -> list[Recording]:
    """Recordings for ``prompts`` (token ids), from the cache where they were made before."""
    path = cache_path(settings, prompts)
    if path.exists():
        log.info("recordings from %s", path)
        return load_recordings(path)
    from wisp_common.config import ServerConfig
    from wisp_distill.data import answer, eager_args
    from wisp_server.engines.factory import build_engine

    started = time.monotonic()
    make_drafter = real_drafters(settings)
    layers = make_drafter().feature_layers  # the rows the draft reads come as a session of it gets them
    # The answers run past EOS (as with ignore_eos) so that drafts verified at the very end have a target token.
    answer_tokens = settings.max_new_tokens + settings.depth + 1
    engine = build_engine(
        ServerConfig(
            target_model=settings.target_model,
            engine=settings.engine,
            dtype=settings.dtype,
            max_sessions=len(prompts),
            max_context_tokens=max(map(len, prompts)) + answer_tokens + 1,
            max_batch_tokens=max(4096, max(map(len, prompts)) + 1),
            max_draft_tokens=1,
            vllm_engine_args=eager_args(layers),
        )
    )
    indexed = dict(enumerate(prompts))
    samples = dict(answer(engine, indexed, answer_tokens, len(prompts), eos=None, feature_layers=layers))
    recordings = []
    for index, prompt in enumerate(prompts):
        sample = samples[index]
        answer_ids = sample.tokens[len(prompt) :].tolist()
        walked = answer_ids[: settings.max_new_tokens]  # a session never commits past its max_new_tokens
        chains = record_chains(make_drafter, prompt, walked, sample.feature_rows(), settings.depth)
        recordings.append(Recording(list(prompt), answer_ids, chains))
        if progress is not None:
            progress(index + 1, len(prompts))
    save_recordings(path, recordings, vars(settings))
    log.info("recorded %d prompts in %.0f s into %s", len(prompts), time.monotonic() - started, path)
    return recordings
