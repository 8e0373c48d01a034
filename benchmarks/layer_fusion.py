"""What EAGLE-3's fusion of the target's low and middle layers would buy a feature-conditioned draft.

EAGLE-3 (Li et al., arXiv 2503.01840) gives its draft the target's low, middle and top hidden states where EAGLE
gives it the top one alone. This asks what reading them buys, as a controlled experiment: two copies of a draft
(the shipped one by default) train the same steps on the same batches of a `wisp-distill` work directory's answers.
One trains as it is; the other adds W [rms(low), rms(middle)] to every feature the target gives it
(`EagleDraftModel.add_feature_layers`), W starting at zero, so both start as the same function and only the fused
copy can learn to read the other layers. Reported: greedy agreement with the target (teacher forcing, and from
the draft's own predicted feature, its second token) on held-out answers and on MT-Bench, before and after, and
the feature bytes a verdict carries per position.

Generate the answers first (`wisp-distill --stage generate --work-dir DIR ...`); the target's other layers are
computed by the engine, as the server sends them (`wisp_distill.data.layer_states`), and cached in DIR. A draft
trained this way ships through `wisp-distill --feature-layers`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from benchmarks.common import add_common_options
from benchmarks.report import print_table, save_plot, write_json

ARMS = ("draft", "fused")  # as it is; with the low and middle layers fused in
MEASURES = ("held_out", "held_out_own", "mt_bench", "mt_bench_own")  # *_own: from the draft's own feature


def train_arm(arm: str, args, train_set, held_out_set, mt_bench) -> dict:
    """One arm: the draft as it is, or (``fused``) reading ``args.layers`` too through a fusion starting at zero.
    The sets are (samples without layers, the same samples with them)."""
    from wisp_common.config import DistillConfig
    from wisp_common.eagle import load_eagle_model
    from wisp_common.models import resolve_model
    from wisp_distill.train import evaluate, losses, make_batches, warmup_cosine

    defaults = DistillConfig()  # wisp-distill's feature noise and token loss weight
    fused = arm == "fused"
    model = load_eagle_model(resolve_model(args.draft_model)).train()
    if fused:
        model.add_feature_layers(tuple(args.layers))
    train_samples, held, mt = (pair[fused] for pair in (train_set, held_out_set, mt_bench))
    held_batches, mt_batches = (make_batches(s, 4096, random.Random(0)) for s in (held, mt))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, args.steps)
    feature_std = float(torch.cat([s.features[:64].float() for s in train_samples[:200]]).std())

    def agreement() -> list[float]:  # teacher-forced and from the draft's own feature (`evaluate`)
        return evaluate(model, held_batches, "cpu", 1.0, steps=2) + evaluate(model, mt_batches, "cpu", 1.0, steps=2)

    start = agreement()
    torch.manual_seed(args.seed)  # the same feature noise for both arms (building the fusion drew from the generator)
    started, step, epoch = time.monotonic(), 0, 0
    with tqdm(total=args.steps, desc=f"training {arm}", unit="step", file=sys.stderr) as bar:
        while step < args.steps:
            epoch_batches = make_batches(train_samples, args.batch_tokens, random.Random(args.seed + epoch))
            for batch in epoch_batches[: args.steps - step]:
                regression, cross_entropy, _ = losses(
                    model, batch, "cpu", defaults.feature_noise, feature_std, args.unroll
                )
                optimizer.zero_grad()
                (regression + defaults.token_loss_weight * cross_entropy).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                step += 1
                bar.update()
            epoch += 1
    seconds = time.monotonic() - started
    return {
        "start": dict(zip(MEASURES, start)),
        "end": dict(zip(MEASURES, agreement())),
        "train_seconds": round(seconds, 1),
        "fusion_weight_norm": float(model.fusion.weight.detach().norm()) if fused else None,
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

    from transformers import AutoConfig

    from benchmarks.draft_quality import target_answers
    from wisp_common.config import DistillConfig
    from wisp_common.models import load_tokenizer, resolve_model
    from wisp_common.prompts import encode_prompt, load_prompts
    from wisp_distill.data import layer_states, layers_cache, load_samples
    from wisp_distill.train import held_out

    depth = AutoConfig.from_pretrained(resolve_model(args.target_model)).num_hidden_layers
    args.layers = tuple(args.layers or (2, depth // 2 - 1))
    if not all(0 <= layer < depth - 1 for layer in args.layers):
        raise SystemExit(f"--layers {args.layers}: 0 to {depth - 2} (layer {depth - 1}'s output is the feature)")
    config = DistillConfig(
        target_model=args.target_model, work_dir=args.work_dir, engine=args.engine, dtype=args.dtype, seed=args.seed
    )
    samples = load_samples(config)

    states = layer_states(config, samples, args.layers, layers_cache(config, args.layers))
    plain, layered = samples, [replace(sample, layers=rows) for sample, rows in zip(samples, states)]
    tokenizer = load_tokenizer(args.target_model)
    prompts = [encode_prompt(tokenizer, text, chat=True) for text in load_prompts(args.prompts)]
    print(f"the target answers {len(prompts)} prompts ({args.answer_tokens} tokens)", file=sys.stderr)
    answers = target_answers(args, prompts, tokenizer.eos_token_id, args.engine, args.layers)
    mt_bench = [replace(sample, layers=None) for sample in answers], answers
    held = held_out(len(samples), args.eval_fraction, args.seed)
    kept = [i for i in range(len(samples)) if i not in held]
    train_set = tuple([arm[i] for i in kept] for arm in (plain, layered))
    held_out_set = tuple([arm[i] for i in sorted(held)] for arm in (plain, layered))

    results = {arm: train_arm(arm, args, train_set, held_out_set, mt_bench) for arm in ARMS}
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
