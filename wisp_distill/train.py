"""Stage 2: the draft learns the target's next feature and token (EAGLE), with the training-time test."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from wisp_common.config import DistillConfig
from wisp_common.eagle import EagleDraftModel, decoder_config_of, load_eagle_model, target_output_layers
from wisp_common.models import load_tokenizer, resolve_dtype, resolve_model, target_fingerprint
from wisp_distill.data import Progress, Sample, device_of, layer_states, layers_cache, load_samples, work_dir

log = logging.getLogger("wisp_distill")

AGREEMENT_IDS_BELOW = 8192  # the head always covers the tokenizer's most common ids


def autocast(config: DistillConfig) -> torch.autocast:
    """Training's matrix products in bfloat16 where the hardware computes in it (several times faster than
    float32 there); the weights, optimizer state and losses stay float32."""
    device = device_of(config)
    dtype = resolve_dtype(config.train_dtype, device)
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def head_vocabulary(samples: list[Sample], size: int, vocab: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The most common ids, plus every answer token by frequency, up to ``size`` ids.

    ``keep``: ids that stay in whatever their frequency (a draft's head being widened), so it never narrows.
    """
    counts = torch.zeros(vocab, dtype=torch.long)
    for sample in samples:
        counts += torch.bincount(sample.tokens[sample.prompt_len :].long(), minlength=vocab)
    counts[: min(AGREEMENT_IDS_BELOW, vocab, size)] = counts.max() + 1
    if keep is not None:
        counts[keep.long()] = counts.max() + 1
        size = max(size, len(keep))
    return torch.sort(torch.topk(counts, min(size, vocab)).indices).values


def feature_layers_of(config: DistillConfig) -> tuple[int, ...]:
    """``--feature-layers``, parsed."""
    try:
        return tuple(int(layer) for layer in config.feature_layers.split(",") if layer.strip())
    except ValueError:
        raise SystemExit(f"--feature-layers {config.feature_layers!r}: 0-based layer numbers, e.g. 2,14") from None


def chosen_feature_layers(config: DistillConfig, state: dict | None, start: EagleDraftModel | None) -> tuple:
    """The layers the draft reads: ``--feature-layers``, else a resumed checkpoint's or the --init-from draft's;
    checked before their rows are computed, and refused where they contradict the checkpoint or the start."""
    from transformers import AutoConfig

    from wisp_server.engines.base import check_feature_layers

    asked = feature_layers_of(config)
    kept = tuple(state.get("feature_layers", ())) if state else (start.feature_layers if start else ())
    if asked and asked != kept and (state is not None or kept):  # a draft without layers may be given some
        source = "the checkpoint in the work directory" if state else "the --init-from draft"
        raise SystemExit(f"--feature-layers {list(asked)}: {source} reads {list(kept) or 'none'}")
    layers = asked or kept
    try:
        check_feature_layers(layers, AutoConfig.from_pretrained(resolve_model(config.target_model)).num_hidden_layers)
    except ValueError as error:
        raise SystemExit(f"--feature-layers: {error}") from None
    return layers


def new_model(
    config: DistillConfig, head_ids: torch.Tensor, layers: int | None = None, feature_layers: tuple[int, ...] = ()
) -> EagleDraftModel:
    """The fusion layer starts as identity on the features; decoder layers and norm start as the target's last;
    the feature layers' fusion, at zero."""
    from safetensors import safe_open
    from transformers import AutoConfig

    layers = layers or config.draft_layers or 1
    path = resolve_model(config.target_model)
    target_config = AutoConfig.from_pretrained(path)
    if not 1 <= layers <= target_config.num_hidden_layers:
        raise SystemExit(f"--draft-layers {layers}: must be 1 to the target's {target_config.num_hidden_layers}")
    embedding, head = target_output_layers(config.target_model)
    model = EagleDraftModel(
        config.target_model,
        decoder_config_of(target_config),
        embedding,
        None if head is None else head[head_ids.long()],
        head_ids,
        layers,
        target_fingerprint(path),
    )
    if feature_layers:
        model.add_feature_layers(feature_layers)
    first = target_config.num_hidden_layers - layers
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if key.startswith("model.layers."):
                    index, rest = key[len("model.layers.") :].split(".", 1)
                    if int(index) >= first:
                        state[f"decoder.layers.{int(index) - first}.{rest}"] = handle.get_tensor(key).float()
                elif key == "model.norm.weight":
                    state["decoder.norm.weight"] = handle.get_tensor(key).float()
    model.load_state_dict(state, strict=False)
    hidden = embedding.shape[1]
    with torch.no_grad():
        model.fc.weight.normal_(std=0.02 / math.sqrt(hidden))
        model.fc.weight[:, hidden:] += torch.eye(hidden)
    return model


def grown_from(start: EagleDraftModel, model: EagleDraftModel) -> None:
    """Loads ``start`` into ``model``, whose extra decoder layers begin as identity (their output projections
    zeroed), so the grown draft predicts exactly what ``start`` did and training only adds to it."""
    if model.layers < start.layers:
        raise SystemExit(f"--draft-layers {model.layers} is fewer than the {start.layers} of the --init-from draft")
    # The embedding stays the target's own: `start` carries a float16 copy of it.
    weights = {k: v for k, v in start.state_dict().items() if k != "embed.weight"}
    unexpected = model.load_state_dict({**weights, "head_ids": model.head_ids}, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"the --init-from draft has weights the new draft lacks: {unexpected}")
    with torch.no_grad():
        for layer in model.decoder.layers[start.layers :]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def layers_in(state: dict) -> int:
    """How many decoder layers a checkpoint's weights hold."""
    return 1 + max(int(key.split(".")[2]) for key in state if key.startswith("decoder.layers."))


@dataclass
class Batch:
    features: torch.Tensor  # [b, n, h] the target's features at positions 0..n-1 (wider with `Sample.layers`)
    tokens: torch.Tensor  # [b, n] the token after each position (x_{i+1})
    next_features: torch.Tensor  # [b, n, h] the target's feature one position later (what the draft predicts)
    labels: torch.Tensor  # [b, n] the target's greedy token two positions later; -1 where it is not an answer token
    mask: torch.Tensor  # [b, n] real positions


def held_out(count: int, fraction: float, seed: int) -> set[int]:
    """The indices of the answers kept out of training to measure agreement on: the same for the same seed."""
    return set(random.Random(seed).sample(range(count), max(1, int(count * fraction))))


def make_batches(samples: list[Sample], batch_tokens: int, rng: random.Random) -> list[Batch]:
    """`batch_groups`, collated."""
    return [collate([samples[i] for i in group]) for group in batch_groups(samples, batch_tokens, rng)]


def batch_groups(samples: list[Sample], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """The samples' indices in batches, in ``rng``'s order: samples of similar length together, each batch under
    ``batch_tokens`` padded positions."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].features))
    groups, group = [], []
    for index in order:
        width = len(samples[index].features) - 1
        if group and width * (len(group) + 1) > batch_tokens:
            groups.append(group)
            group = []
        group.append(index)
    groups.append(group)
    rng.shuffle(groups)
    return [g for g in groups if g]


def collate(samples: list[Sample]) -> Batch:
    n = max(len(s.features) for s in samples) - 1
    hidden = samples[0].features.shape[1]
    width = hidden + (0 if samples[0].layers is None else samples[0].layers.shape[1])
    batch = Batch(
        torch.zeros(len(samples), n, width, dtype=torch.float16),
        torch.zeros(len(samples), n, dtype=torch.long),
        torch.zeros(len(samples), n, hidden, dtype=torch.float16),
        torch.full((len(samples), n), -1, dtype=torch.long),
        torch.zeros(len(samples), n, dtype=torch.bool),
    )
    for row, s in enumerate(samples):
        m = len(s.features) - 1  # pairs (f_i, x_{i+1}) whose next feature f_{i+1} is known
        batch.features[row, :m] = s.feature_rows()[:m]
        batch.tokens[row, :m] = s.tokens[1 : m + 1].long()
        batch.next_features[row, :m] = s.features[1 : m + 1]
        labels = s.tokens[2 : m + 2].long()
        answer = torch.arange(2, m + 2) >= s.prompt_len  # greedy answers are the target's own argmax
        batch.labels[row, :m] = torch.where(answer, labels, torch.full_like(labels, -1))
        batch.mask[row, :m] = True
    return batch


def losses(model: EagleDraftModel, batch: Batch, device: str, noise: float, feature_std: float, unroll: int = 1):
    """Feature regression and soft cross entropy against the target over the head's vocabulary, each averaged
    over ``unroll`` steps, and each step's agreement as (hits, scored positions).

    Step 1 conditions on the target's features (teacher forcing). Each further step conditions on the step
    before's predictions, shifted one position on, as the draft does past its first token between verdicts.
    Training on them is the training-time test of HASS (Zhang et al., arXiv 2408.15766) and EAGLE-3 (Li et al.,
    arXiv 2503.01840): it teaches the draft to work from its own, drifting, features.
    """
    features = model.fuse(batch.features.to(device).float())
    if noise > 0:
        features = features + (torch.rand_like(features) * 2 - 1) * noise * feature_std
    tokens, mask, labels = batch.tokens.to(device), batch.mask.to(device), batch.labels.to(device)
    target_features = batch.next_features.to(device).float()
    with torch.no_grad(), torch.autocast(device.split(":")[0], enabled=False):  # the teacher in full precision
        target_probs = (target_features[mask] @ model.head.T).softmax(-1)
    scored = labels >= 0
    regression = cross_entropy = torch.zeros((), device=device)
    agreements = []
    for predicted, logits in unrolled(model, features, tokens, unroll):
        predicted, logits = predicted.float(), logits.float()  # losses in float32, under autocast too
        regression = regression + F.smooth_l1_loss(predicted[mask], target_features[mask]) / unroll
        cross_entropy = cross_entropy - (target_probs * logits[mask].log_softmax(-1)).sum(-1).mean() / unroll
        picked = model.head_ids[logits.argmax(-1)]
        agreements.append(((picked[scored] == labels[scored]).float().sum().item(), int(scored.sum())))
    return regression, cross_entropy, agreements


def unrolled(model: EagleDraftModel, features: torch.Tensor, tokens: torch.Tensor, steps: int):
    """The draft's (predicted features, logits) at each step: the first from ``features``, each next one from
    the step before's predictions shifted one position on (position 0 keeps its given feature).

    Step k's query at position i sees what the drafter's k-th draft after a verdict sees: the pairs built from
    the target's features up to position i - k + 1, then one pair from each later step (`step_mask`). All
    steps' keys stay in one cache, so each step costs one pass over the sequence.
    """
    cache = DynamicCache()
    features = model.fuse(features)  # the draft's own predictions replace the fused feature
    n = tokens.shape[1]
    positions = torch.arange(n, device=tokens.device)[None]
    for step in range(steps):
        mask = step_mask(n, step, tokens.device) if step else None
        predicted, logits = model(features, tokens, cache, positions, attention_mask=mask)
        yield predicted, logits
        features = torch.cat([features[:, :1], predicted[:, :-1]], dim=1)


def step_mask(n: int, step: int, device) -> torch.Tensor:
    """[1, 1, n, (step + 1) * n], True where step ``step`` (0: teacher forcing) at position i may attend: the
    first step's keys at positions <= i - step, and step r's key at position i - (step - r) for r = 1..step."""
    i, j = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
    blocks = [j <= i - step] + [j == i - (step - r) for r in range(1, step + 1)]
    return torch.cat(blocks, dim=1)[None, None]


def evaluate(
    model: EagleDraftModel, batches: list[Batch], device: str, feature_std: float, steps: int = 1
) -> list[float]:
    """Greedy agreement at each of ``steps`` unrolled steps: the draft's top token equals the target's at answer
    positions (step 1: teacher forcing on the target's features; 2: on the draft's own prediction of the feature
    before)."""
    model.eval()
    hits, total = [0.0] * steps, 0
    with torch.inference_mode():
        for batch in batches:
            agreements = losses(model, batch, device, 0.0, feature_std, unroll=steps)[2]
            hits = [h + step_hits for h, (step_hits, _) in zip(hits, agreements)]
            total += agreements[0][1]
    model.train()
    return [h / max(total, 1) for h in hits]


def train(config: DistillConfig) -> None:
    device = device_of(config)
    torch.manual_seed(config.seed)
    samples = load_samples(config)
    held = held_out(len(samples), config.eval_fraction, config.seed)
    checkpoint_path = work_dir(config) / "checkpoint.pt"
    vocab = len(load_tokenizer(config.target_model))
    state = torch.load(checkpoint_path) if checkpoint_path.exists() else None
    start = load_eagle_model(resolve_model(config.init_from)) if config.init_from and not state else None
    feature_layers = chosen_feature_layers(config, state, start)
    if feature_layers:
        cache = layers_cache(config, feature_layers)
        for sample, rows in zip(samples, layer_states(config, samples, feature_layers, cache)):
            sample.layers = rows
        torch.manual_seed(config.seed)  # an engine built for them seeds torch itself (vLLM's worker: with 0)
    train_set = [s for i, s in enumerate(samples) if i not in held]
    eval_batches = make_batches([samples[i] for i in sorted(held)], config.batch_tokens, random.Random(0))
    if state:
        head_ids = state["head_ids"]
    else:  # a start's head is kept when widened to --head-vocab; narrowed, the answers' most common ids stay
        keep = start.head_ids if start and config.head_vocab >= len(start.head_ids) else None
        head_ids = head_vocabulary(train_set, config.head_vocab, vocab, keep=keep)
    layers = layers_in(state["model"]) if state else config.draft_layers or (start.layers if start else 1)
    model = new_model(config, head_ids, layers, feature_layers).to(device)
    if start:
        grown_from(start, model)
        log.info(
            "train: starting from the draft %s (its head of %d ids, now %d ids; %d decoder layers, now %d)",
            config.init_from,
            len(start.head_ids),
            len(head_ids),
            start.layers,
            model.layers,
        )
    feature_std = float(torch.cat([s.features[:64].float() for s in train_set[:200]]).std())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    batches_per_epoch = len(make_batches(train_set, config.batch_tokens, random.Random(0)))
    total_steps = max(1, int(config.epochs * batches_per_epoch))
    schedule = warmup_cosine(optimizer, total_steps)
    step = 0
    if state:
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        log.info("train: resumed at step %d of %d", step, total_steps)
    covered = sum(int(torch.isin(s.tokens[s.prompt_len :].long(), head_ids).sum()) for s in samples)
    answer_tokens = sum(len(s.tokens) - s.prompt_len for s in samples)
    log.info(
        "train: %d answers (%d tokens; %d held out), head of %d ids covers %.1f%% of answer tokens, %d steps on %s",
        len(train_set),
        answer_tokens,
        len(held),
        len(head_ids),
        100 * covered / answer_tokens,
        total_steps,
        device,
    )
    model.train()
    progress, checkpoints = Progress(config.log_every), Progress(10 * config.log_every)
    seen, sums = 0, [0.0, 0.0, 0, 0, 0, 0]  # feature loss, token CE, hits, scored positions, batches, last step's hits
    epoch = step // batches_per_epoch
    while step < total_steps:
        batches = make_batches(train_set, config.batch_tokens, random.Random(config.seed + epoch))
        for batch in batches[step % batches_per_epoch :]:
            with autocast(config):
                regression, cross_entropy, agreements = losses(
                    model, batch, device, config.feature_noise, feature_std, config.unroll
                )
            (hits, scored), (own_hits, _) = agreements[0], agreements[-1]
            loss = regression + config.token_loss_weight * cross_entropy
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            seen += int(batch.mask.sum())
            sums = [a + b for a, b in zip(sums, (regression.item(), cross_entropy.item(), hits, scored, 1, own_hits))]
            last = step >= total_steps
            if progress.due() or last:
                log.info(
                    "train: step %d/%d (epoch %.2f), %.0f tok/s, feature loss %.4f, token CE %.3f, agreement %.3f "
                    "(step %d: %.3f)",
                    step,
                    total_steps,
                    step / batches_per_epoch,
                    seen / progress.elapsed,
                    sums[0] / sums[4],
                    sums[1] / sums[4],
                    sums[2] / max(1, sums[3]),
                    config.unroll,
                    sums[5] / max(1, sums[3]),
                )
                sums = [0.0, 0.0, 0, 0, 0, 0]
            if checkpoints.due() or last:
                agreement, own = evaluate(model, eval_batches, device, feature_std, steps=2)
                log.info(
                    "train: held-out agreement %.3f (on its own features: %.3f); checkpoint saved at step %d",
                    agreement,
                    own,
                    step,
                )
                save_checkpoint(checkpoint_path, model, optimizer, schedule, step, head_ids, agreement)
            if last:
                break
        epoch += 1


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate as a fraction of the peak: a linear warm-up over a tenth of the steps (at most 200), then
    cosine decay to zero at ``total_steps``."""
    warmup = min(200, total_steps // 10 + 1)

    def fraction(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fraction)


def save_checkpoint(path: Path, model, optimizer, schedule, step: int, head_ids, agreement: float) -> None:
    trainable = {k: v for k, v in model.state_dict().items() if k not in ("embed.weight",)}
    state = {
        "model": trainable,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "step": step,
        "head_ids": head_ids,
        "feature_layers": model.feature_layers,
        "agreement": agreement,
    }
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
