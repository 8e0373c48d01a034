"""Stage 1: the target's answers to training prompts, with its features, in resumable shards."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from wisp_common.config import DistillConfig, ServerConfig
from wisp_common.models import load_tokenizer, resolve_device
from wisp_common.prompts import encode_prompt, load_prompts
from wisp_common.request import SamplingParams
from wisp_common.training_prompts import training_prompts, word_ngrams
from wisp_server.engines.base import RoundRequest
from wisp_server.engines.factory import build_engine

log = logging.getLogger("wisp_distill")

SHARD_SIZE = 64

SELF_PROMPT_TOKENS = 96  # a self-written prompt that has not ended by then is dropped
SELF_PROMPT_SAMPLING = SamplingParams(temperature=1.0, top_p=0.95)
# Left alone, a small target writes mostly advice-seeking questions. Starting a prompt with a task's opening
# words steers it to the other task kinds of instruction data (Magpie's categories, arXiv 2406.08464):
# writing, editing, role play, maths, coding, data analysis, reasoning, information seeking, brainstorming.
TASK_OPENINGS = (
    *("Write a", "Compose a", "Draft a", "Rewrite", "Edit the following"),
    *("Pretend", "Imagine you are", "Act as"),
    *("Solve", "Calculate", "Find the", "Prove that"),
    *("Write a Python function", "Implement", "Write a program", "Fix the", "What does this code"),
    *("Given the", "Extract", "Summarize", "Classify"),
    *("Suppose", "If", "Which"),
    *("Explain", "Describe", "Discuss", "Compare", "What are", "How does"),
    *("List", "Suggest"),
)


@dataclass
class Sample:
    prompt_len: int
    tokens: torch.Tensor  # int32 [prompt + answer]
    features: torch.Tensor | None  # float16 [prompt + answer - 1, hidden]: the target's feature at each position
    # float16 [prompt + answer - 1, layers x hidden]: the outputs of the draft's feature layers there (`layer_states`)
    layers: torch.Tensor | None = None

    def feature_rows(self) -> torch.Tensor:
        """The features and layers as verdicts carry them (`wisp_common.features.feature_rows`)."""
        return self.features if self.layers is None else torch.cat([self.features, self.layers], -1)


def work_dir(config: DistillConfig) -> Path:
    return Path(config.work_dir or f"{config.output}.work")


def device_of(config: DistillConfig) -> str:
    return resolve_device(config.device)


class Progress:
    """A line every ``every`` seconds: long stages must show they are alive."""

    def __init__(self, every: float):
        self.every, self.started, self.last = every, time.monotonic(), 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            return True
        return False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return encode_prompt(tokenizer, prompt, chat=True)


def prompt_source(config: DistillConfig) -> str:
    return "file" if config.prompts_file else config.prompt_source


def excluded_texts(config: DistillConfig) -> list[str]:
    """Every prompt of every ``--exclude-file`` (comma-separated): no training prompt may share 8 words with one."""
    return [text for path in config.exclude_file.split(",") if path.strip() for text in load_prompts(path.strip())]


def pre_query_ids(tokenizer) -> list[int]:
    """The chat template up to where the user's words go: what a self-written prompt is sampled after."""
    if not tokenizer.chat_template:
        raise SystemExit("--prompt-source self needs a chat template; use --prompt-source templates or --prompts-file")
    marker = "WISP-PROMPT-MARKER"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return tokenizer.encode(text[: text.index(marker)], add_special_tokens=False)


def self_prompts(engine, tokenizer, config: DistillConfig, have: list[str], banned: set) -> list[str]:
    """Prompts the target writes itself, sampled until there are ``num_prompts`` distinct, finished ones that share
    no ``banned`` 8-word sequence."""
    prompts, pre, eos = dict.fromkeys(have), pre_query_ids(tokenizer), tokenizer.eos_token_id
    # Each attempt is seeded: a rerun writes the same prompts, and a resumed run that asks for more writes new ones.
    rng = random.Random(f"{config.seed}/{len(have)}")
    progress, written_count = Progress(config.log_every), 0
    while len(prompts) < config.num_prompts:
        # Every prompt of a pass is kept, not the first to finish, so that long prompts are not under-represented.
        count = int(1.25 * (config.num_prompts - len(prompts))) + 8
        openings = {i: rng.choice(TASK_OPENINGS) if config.task_openings else "" for i in range(count)}
        wanted = {i: pre + tokenizer.encode(o, add_special_tokens=False) for i, o in openings.items()}
        attempts = {i: rng.randrange(1, 2**31) for i in wanted}
        for index, sample in answer(
            engine, wanted, SELF_PROMPT_TOKENS, config.concurrency, eos, SELF_PROMPT_SAMPLING, seeds=attempts
        ):
            written = sample.tokens[sample.prompt_len :].tolist()
            text = (openings[index] + tokenizer.decode(written[:-1], skip_special_tokens=True)).strip()
            written_count += 1
            if written[-1] == eos and len(text.split()) >= 3 and not word_ngrams(text, 8) & banned:
                prompts.setdefault(text)
            if progress.due():
                log.info(
                    "generate: the target has written %d prompts, %d kept", written_count, len(prompts) - len(have)
                )
    kept = len(prompts) - len(have)
    log.info("generate: %d of the %d prompts the target wrote were kept (%d in all)", kept, written_count, len(prompts))
    return list(prompts)[: config.num_prompts]


def new_prompt_texts(config: DistillConfig, tokenizer, engine, have: list[str]) -> list[str]:
    source, excluded = prompt_source(config), excluded_texts(config)
    if source == "templates":
        return training_prompts(config.num_prompts, config.seed, excluded)
    banned = set().union(*(word_ngrams(text, 8) for text in excluded))
    if source == "self":
        return self_prompts(engine, tokenizer, config, have, banned)
    return [p for p in load_prompts(config.prompts_file) if not word_ngrams(p, 8) & banned]


def target_engine(config: DistillConfig, max_context: int, feature_layers: tuple[int, ...] = ()):
    """WISP's own verification engine for the target, sized to answer ``concurrency`` prompts at once; able to
    return ``feature_layers``."""
    return build_engine(
        ServerConfig(
            target_model=config.target_model,
            engine=config.engine,
            dtype=config.dtype,
            device=device_of(config),
            threads=config.threads,
            max_sessions=config.concurrency,
            max_context_tokens=max_context,
            max_batch_tokens=max(4096, max_context),
            max_draft_tokens=1,
            kv_cache_gib=config.kv_cache_gib,
            vllm_engine_args=eager_args(feature_layers),
        )
    )


def eager_args(feature_layers: tuple[int, ...]) -> str:
    """`ServerConfig.vllm_engine_args` for an engine that returns ``feature_layers``: vLLM returns a model's inner
    layers only uncompiled (the CPU's default; on a GPU it compiles unless told not to)."""
    return json.dumps({"enforce_eager": True}) if feature_layers else ""


def answer(
    engine,
    prompts: dict[int, list[int]],
    max_answer_tokens: int,
    concurrency: int,
    eos: int | None,
    sampling: SamplingParams = SamplingParams(),
    with_features: bool = True,
    seeds: Mapping[int, int] | None = None,
    feature_layers: tuple[int, ...] = (),
):
    """The target's answers (greedy by default), ``concurrency`` at a time; yields (index, Sample) as they end.

    ``seeds``: a sampling seed per prompt, so that sampled answers are reproducible and differ between prompts;
    ``feature_layers``: decoder layers whose outputs follow each feature row, as a draft reading them gets them.

    Every step decodes one token for every running answer (an empty draft), so
    the engine batches them like plain continuous batching.
    """
    queue = list(prompts)
    longest = max(len(p) for p in prompts.values()) + max_answer_tokens + 1
    active: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    try:
        while queue or active:
            while queue and len(active) < concurrency:
                index = queue.pop(0)
                params = replace(sampling, seed=seeds[index]) if seeds else sampling
                engine.add_session(str(index), prompts[index], params, longest, with_features, 0, feature_layers)
                active[index] = ([], [])
            indices = list(active)
            for index, verdict in zip(indices, engine.verify([RoundRequest(str(i), ()) for i in indices])):
                tokens, features = active[index]
                tokens.append(verdict.next_token)
                if with_features:
                    features.append(verdict.features.to(torch.float16))
                if verdict.next_token == eos or len(tokens) >= max_answer_tokens:
                    engine.remove_session(str(index))
                    del active[index]
                    prompt = prompts[index]
                    ids = torch.tensor(prompt + tokens, dtype=torch.int32)
                    if not with_features:
                        yield index, Sample(len(prompt), ids, None)
                        continue
                    rows = torch.cat(features)
                    hidden = rows.shape[1] // (1 + len(feature_layers))
                    layers = rows[:, hidden:] if feature_layers else None
                    yield index, Sample(len(prompt), ids, rows[:, :hidden], layers)
    finally:  # a consumer that stops early leaves no session behind in the engine
        for index in active:
            engine.remove_session(str(index))


def generate(config: DistillConfig) -> None:
    """Answers every prompt whose shard is missing or part-full; several shards' answers are generated together.

    The prompts are kept in the work directory, so a resumed run answers the same ones.
    """
    data = work_dir(config) / "data"
    data.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.target_model)
    source = prompt_source(config)
    kept = work_dir(config) / f"prompts-{source}.jsonl"
    texts = load_prompts(kept) if kept.exists() else []
    engine = None
    if len(texts) < config.num_prompts:
        if source == "self":  # room for the answers to the prompts it writes, too
            context = len(pre_query_ids(tokenizer)) + 2 * SELF_PROMPT_TOKENS + config.max_answer_tokens
            engine = target_engine(config, context)
        texts = new_prompt_texts(config, tokenizer, engine, texts)
        kept.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    prompts = [chat_ids(tokenizer, text) for text in texts[: config.num_prompts]]
    shards = math.ceil(len(prompts) / SHARD_SIZE)
    todo = [s for s in range(shards) if not shard_done(data, source, s, len(prompts))]
    wanted = {i: prompts[i] for s in todo for i in _shard_range(s, len(prompts))}
    if not wanted:
        log.info("generate: all %d shards of %s prompts present", shards, source)
        return
    engine = engine or target_engine(config, max(len(p) for p in prompts) + config.max_answer_tokens + 1)
    log.info("generate: %d %s prompts, %d shards, %d at once", len(wanted), source, len(todo), config.concurrency)
    done: dict[int, Sample] = {}
    progress, generated = Progress(config.log_every), 0
    for index, sample in answer(engine, wanted, config.max_answer_tokens, config.concurrency, tokenizer.eos_token_id):
        done[index] = sample
        generated += len(sample.tokens) - sample.prompt_len
        for shard in [s for s in todo if all(i in done for i in _shard_range(s, len(prompts)))]:
            records = [asdict(done.pop(i)) for i in _shard_range(shard, len(prompts))]
            torch.save(records, shard_path(data, source, shard))
            todo.remove(shard)
        if progress.due():
            rate = generated / progress.elapsed
            log.info("generate: %d shards left, %d answer tokens, %.0f tok/s", len(todo), generated, rate)


def shard_path(data: Path, source: str, shard: int) -> Path:
    return data / f"{source}-shard-{shard:05d}.pt"


def _shard_range(shard: int, total: int) -> range:
    return range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, total))


def shard_done(data: Path, source: str, shard: int, total: int) -> bool:
    """A shard is done when it holds all its prompts: a run asked for more prompts than the last refills the last
    shard it left part-full."""
    path = shard_path(data, source, shard)
    return path.exists() and len(torch.load(path, mmap=True)) == len(_shard_range(shard, total))


def layer_states(
    config: DistillConfig, samples: list[Sample], layers: tuple[int, ...], cache: Path | None = None
) -> list[torch.Tensor]:
    """``samples``' `Sample.layers` for decoder ``layers``: the rows the server would send beside each feature,
    computed by the same engine teacher-forced along each sample (one verification of its text, no drafts).

    ``cache``: a file that keeps them for the next run (the answers need not be generated again to train a draft
    on other layers), with a hash of the target's weights and the samples' tokens: computed again where either
    changed."""
    import hashlib

    from tqdm import tqdm

    from wisp_common.models import resolve_model, target_fingerprint

    key = hashlib.sha256(target_fingerprint(resolve_model(config.target_model)).encode())
    for sample in samples:
        key.update(sample.tokens.numpy().tobytes())
    kept = torch.load(cache) if cache is not None and cache.exists() else {}
    if isinstance(kept, dict) and kept.get("key") == key.hexdigest():
        return kept["rows"]
    engine = target_engine(config, max(len(s.tokens) for s in samples), layers)
    hidden = samples[0].features.shape[1]
    computed: list[torch.Tensor] = []
    with tqdm(total=sum(len(s.features) for s in samples), desc="the target's layers", unit="tok") as bar:
        for start in range(0, len(samples), config.concurrency):
            group = range(start, min(start + config.concurrency, len(samples)))
            try:
                for i in group:
                    context = samples[i].tokens[:-1].tolist()
                    engine.add_session(str(i), context, SamplingParams(), len(context) + 1, True, 0, layers)
                verdicts = engine.verify([RoundRequest(str(i), ()) for i in group])
            finally:
                for i in group:
                    engine.remove_session(str(i))
            computed += [verdict.features[:, hidden:].to(torch.float16) for verdict in verdicts]
            bar.update(sum(len(samples[i].features) for i in group))
    if cache is not None:
        torch.save({"key": key.hexdigest(), "rows": computed}, cache)
    return computed


def layers_cache(config: DistillConfig, layers: tuple[int, ...]) -> Path:
    """Where the work directory keeps its answers' `layer_states`."""
    return work_dir(config) / f"layers-{'-'.join(map(str, layers))}.pt"


def load_samples(config: DistillConfig) -> list[Sample]:
    files = sorted((work_dir(config) / "data").glob("*shard-*.pt"))
    if not files:
        raise SystemExit(f"no training data in {work_dir(config) / 'data'}: run the generate stage first")
    return [Sample(**record) for file in files for record in torch.load(file)]
