"""`wisp-distill`: generate, train and export a draft for a target; every stage resumes where it stopped."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from wisp_common.config import DistillConfig, add_config_arguments, config_from_args
from wisp_distill.data import generate
from wisp_distill.export import export
from wisp_distill.train import train

log = logging.getLogger("wisp_distill")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wisp-distill",
        description="Train a feature-conditioned draft for a target model: generate, train, export (resumable).",
    )
    add_config_arguments(parser, DistillConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    config = config_from_args(DistillConfig, args)
    if config.threads:
        torch.set_num_threads(config.threads)
    stages = {"generate": generate, "train": train, "export": export}
    try:
        for name, stage in stages.items():
            if config.stage in ("all", name):
                stage(config)
    except KeyboardInterrupt:
        log.info("interrupted: run the same command again to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
