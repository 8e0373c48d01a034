"""The defaults the benchmarks share, and the command-line options two or more of them define alike."""

from __future__ import annotations

import argparse
from pathlib import Path

from wisp_bench import MT_BENCH  # MT-Bench questions (FastChat, Apache-2.0), shipped with wisp-bench
from wisp_common.config import DEFAULT_DRAFT, DEFAULT_TARGET

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent  # the repository root: where ``python -m benchmarks.<name>`` runs from
RESULTS = PACKAGE / "results"
RESULTS_ENV = "WISP_BENCH_RESULTS"  # where set, the folder results are written to instead of RESULTS
DEFAULT_DTYPE = "auto"
DTYPE_HELP = "auto: bfloat16 where the CPU computes in it, else float32"

__all__ = [
    "DEFAULT_DRAFT",
    "DEFAULT_DTYPE",
    "DEFAULT_TARGET",
    "DTYPE_HELP",
    "MT_BENCH",
    "RESULTS",
    "RESULTS_ENV",
    "ROOT",
    "add_common_options",
]


def add_common_options(
    parser: argparse.ArgumentParser,
    *,
    draft_model: bool = False,
    dtype: str = DEFAULT_DTYPE,
    dtype_help: str = DTYPE_HELP,
    prompts_flag: str | None = None,
    answer_tokens: bool = False,
    repeats: bool = False,
) -> argparse.ArgumentParser:
    """Adds the options the benchmarks share: always ``--target-model`` and ``--dtype``; on request
    ``--draft-model``, a prompts file under the name ``prompts_flag`` (MT-Bench by default),
    ``--answer-tokens`` and ``--repeats``."""
    parser.add_argument("--target-model", default=DEFAULT_TARGET)
    if draft_model:
        parser.add_argument("--draft-model", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default=dtype, help=dtype_help)
    if prompts_flag:
        parser.add_argument(prompts_flag, default=str(MT_BENCH), help="JSONL / MT-Bench / ShareGPT prompts")
    if answer_tokens:
        parser.add_argument("--answer-tokens", type=int, default=96)
    if repeats:
        parser.add_argument("--repeats", type=int, default=2, help="turns per configuration, in alternating order")
    return parser
