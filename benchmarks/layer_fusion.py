"""What EAGLE-3's fusion of the target's low and middle layers would buy a feature-conditioned draft.

EAGLE-3 (Li et al., arXiv 2503.01840) gives its draft the target's low, middle and top hidden states where EAGLE
gives it the top one alone. Before the engines, the wire and the edge carry more than the top layer, this asks
what that would buy: two copies of a draft (the shipped one by default) train the same steps on the same batches
of a `wisp-distill` work directory's answers. One trains as it is; the other adds W [rms(low), rms(middle)] to
every feature the target gives it, W starting at zero, so both start as the same function and only the fused copy
can learn to read the other layers. Reported: greedy agreement with the target (teacher forcing, and from the
draft's own predicted feature, its second token) on held-out answers and on MT-Bench, before and after, and the
feature bytes a verdict would carry per position.

Generate the answers first (`wisp-distill --stage generate --work-dir DIR ...`); the target's other layers are
computed here with transformers and cached in DIR.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from benchmarks.common import add_common_options
from benchmarks.report import print_table, save_plot, write_json

ARMS = ("draft", "fused")  # as it is; with the low and middle layers fused in
MEASURES = ("held_out", "held_out_own", "mt_bench", "mt_bench_own")  # *_own: from the draft's own feature


class LayerFusion(nn.Module):
    """feature + W [low, middle] with W zero at the start: the draft's function is unchanged until it learns."""

    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.project = nn.Linear(layers * hidden, hidden, bias=False)
        nn.init.zeros_(self.project.weight)

    def forward(self, batch, states: torch.Tensor):
        """``states``: `collate_states` of the same samples as ``batch``."""
        return replace(batch, features=batch.features.float() + self.project(states.float()))


def rms_normalised(x: torch.Tensor) -> torch.Tensor:
    """The residual stream's scale grows with depth; the projection sees every layer at unit scale."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def layer_states(target, samples, layers: list[int], batch_tokens: int = 4096) -> list[torch.Tensor]:
    """Per sample, [len - 1, len(layers) * hidden] float16: the outputs of decoder ``layers`` (0-based), each
    RMS-normalised, at each position that has a feature, teacher-forced along the sample's tokens.

    (transformers' last hidden state is the top layer's output after the final norm: the feature itself.)"""
    from wisp_distill.train import batch_groups

    states: dict[int, torch.Tensor] = {}
    groups = batch_groups(samples, batch_tokens, random.Random(0))
    for group in tqdm(groups, desc="the target's layers", unit="batch", file=sys.stderr):
        ids = torch.zeros(len(group), max(len(samples[i].tokens) for i in group), dtype=torch.long)
        for row, i in enumerate(group):  # padded on the right: causal attention keeps each row's own states
            ids[row, : len(samples[i].tokens)] = samples[i].tokens.long()
        with torch.inference_mode():
            hidden = target.model(input_ids=ids, output_hidden_states=True).hidden_states
        for row, i in enumerate(group):
            m = len(samples[i].tokens) - 1
            states[i] = torch.cat([rms_normalised(hidden[k + 1][row, :m].float()) for k in layers], -1).half()
    return [states[i] for i in range(len(samples))]


def collate_states(rows: list[torch.Tensor]) -> torch.Tensor:
    """Aligned with `wisp_distill.train.collate`'s features: a sample's first len - 1 positions."""
    out = torch.zeros(len(rows), max(len(r) for r in rows) - 1, rows[0].shape[1], dtype=torch.float16)
    for i, r in enumerate(rows):
        out[i, : len(r) - 1] = r[:-1]
    return out


def batches(samples, states, batch_tokens: int, seed: int) -> Iterator[tuple]:
    """(features batch, layer states batch) pairs, as `wisp_distill.train.make_batches` orders them."""
    from wisp_distill.train import batch_groups, collate

    for group in batch_groups(samples, batch_tokens, random.Random(seed)):
        yield collate([samples[i] for i in group]), collate_states([states[i] for i in group])


def agreement(model, fusion: LayerFusion | None, pairs: list[tuple]) -> list[float]:
    """Greedy agreement from the target's features and from the draft's own (`wisp_distill.train.evaluate`)."""
    from wisp_distill.train import evaluate

    with torch.inference_mode():
        fed = [fusion(batch, states) if fusion else batch for batch, states in pairs]
    return evaluate(model, fed, "cpu", 1.0, steps=2)


def train_arm(arm: str, args, train_set, held_out_batches, mt_bench) -> dict:
    from wisp_common.config import DistillConfig
    from wisp_common.eagle import load_eagle_model
    from wisp_common.models import resolve_model
    from wisp_distill.train import losses, warmup_cosine

    defaults = DistillConfig()  # wisp-distill's feature noise and token loss weight

    torch.manual_seed(args.seed)
    model = load_eagle_model(resolve_model(args.draft_model)).train()
    fusion = LayerFusion(model.embed.weight.shape[1], len(args.layers)) if arm == "fused" else None
    params = [p for p in model.parameters() if p.requires_grad] + (list(fusion.parameters()) if fusion else [])
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, args.steps)
    samples, states = train_set
    noise = defaults.feature_noise
    feature_std = float(torch.cat([s.features[:64].float() for s in samples[:200]]).std())
    start = agreement(model, fusion, held_out_batches) + agreement(model, fusion, mt_bench)
    torch.manual_seed(args.seed)  # the same feature noise for both arms (building W drew from the generator)
    started, step, epoch = time.monotonic(), 0, 0
    with tqdm(total=args.steps, desc=f"training {arm}", unit="step", file=sys.stderr) as bar:
        while step < args.steps:
            epoch_batches = batches(samples, states, args.batch_tokens, args.seed + epoch)
            for batch, batch_states in islice(epoch_batches, args.steps - step):
                fed = fusion(batch, batch_states) if fusion else batch
                regression, cross_entropy, _ = losses(model, fed, "cpu", noise, feature_std, args.unroll)
                optimizer.zero_grad()
                (regression + defaults.token_loss_weight * cross_entropy).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                step += 1
                bar.update()
            epoch += 1
    seconds = time.monotonic() - started
    end = agreement(model, fusion, held_out_batches) + agreement(model, fusion, mt_bench)
    return {
        "start": dict(zip(MEASURES, start)),
        "end": dict(zip(MEASURES, end)),
        "train_seconds": round(seconds, 1),
        "fusion_weight_norm": float(fusion.project.weight.detach().norm()) if fusion else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layer_fusion", description=__doc__.splitlines()[0])
    add_common_options(parser, draft_model=True, prompts_flag="--prompts", answer_tokens=True)
    parser.add_argument("--work-dir", required=True, help="a wisp-distill work directory with generated answers")
    parser.add_argument(
        "--layers", type=int, nargs="+", help="0-based decoder layers whose outputs to fuse (default: 2 and L/2 - 1)"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps per arm")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--unroll", type=int, default=2, help="training-time test steps, as wisp-distill --unroll")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="answers held out of training")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="the engine answering MT-Bench")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from benchmarks.draft_quality import target_answers
    from wisp_common.config import DistillConfig
    from wisp_common.models import load_causal_lm, load_tokenizer
    from wisp_common.prompts import encode_prompt, load_prompts
    from wisp_distill.data import load_samples
    from wisp_distill.train import held_out

    target = load_causal_lm(args.target_model).float().eval()
    depth = target.config.num_hidden_layers
    args.layers = args.layers or [2, depth // 2 - 1]
    if not all(0 <= layer < depth - 1 for layer in args.layers):
        raise SystemExit(f"--layers {args.layers}: 0 to {depth - 2} (layer {depth - 1}'s output is the feature)")
    samples = load_samples(DistillConfig(target_model=args.target_model, work_dir=args.work_dir))
    cache = Path(args.work_dir) / f"layers-{'-'.join(map(str, args.layers))}.pt"
    states = torch.load(cache) if cache.exists() else []
    if [len(rows) for rows in states] != [len(sample.features) for sample in samples]:  # stale: answered again
        states = layer_states(target, samples, args.layers)
        torch.save(states, cache)
    tokenizer = load_tokenizer(args.target_model)
    prompts = [encode_prompt(tokenizer, text, chat=True) for text in load_prompts(args.prompts)]
    print(f"the target answers {len(prompts)} prompts ({args.answer_tokens} tokens)", file=sys.stderr)
    mt_samples = target_answers(args, prompts, tokenizer.eos_token_id, engine=args.engine)
    mt_bench = list(batches(mt_samples, layer_states(target, mt_samples, args.layers), 4096, 0))
    held = held_out(len(samples), args.eval_fraction, args.seed)
    kept = [i for i in range(len(samples)) if i not in held]
    train_set = ([samples[i] for i in kept], [states[i] for i in kept])
    held_out_batches = list(batches([samples[i] for i in sorted(held)], [states[i] for i in sorted(held)], 4096, 0))

    results = {arm: train_arm(arm, args, train_set, held_out_batches, mt_bench) for arm in ARMS}
    hidden = samples[0].features.shape[1]
    rows = [["start", *(results["draft"]["start"][m] for m in MEASURES)]]
    rows += [[f"{arm}, {args.steps} steps", *(results[arm]["end"][m] for m in MEASURES)] for arm in ARMS]
    print_table(["draft", "held-out", "held-out, own", "MT-Bench", "MT-Bench, own"], rows)
    answer_tokens = sum(len(s.tokens) - s.prompt_len for s in samples)

    def draw(ax) -> None:
        width = 0.27
        for k, (label, *values) in enumerate(rows):
            ax.bar([i + (k - 1) * width for i in range(len(MEASURES))], values, width, label=label)
        ax.set_xticks(range(len(MEASURES)), ["held-out", "held-out,\nown feature", "MT-Bench", "MT-Bench,\nown"])
        ax.set(ylabel="greedy agreement with the target", title=f"fusing layers {args.layers} (EAGLE-3)")
        ax.set_ylim(bottom=min(min(r[1:]) for r in rows) - 0.05)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()

    png = save_plot("layer_fusion", draw)
    path = write_json(
        "layer_fusion",
        {
            "args": vars(args),
            "answers": len(samples),
            "answer_tokens": answer_tokens,
            "held_out": len(held),
            "results": results,
            # what a verdict carries per position of features, float16 on the wire
            "feature_bytes_per_position": {"draft": 2 * hidden, "fused": 2 * hidden * (1 + len(args.layers))},
        },
    )
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
