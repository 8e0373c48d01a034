"""Stage 3: the trained draft, the target's tokenizer and a record of the recipe, as a loadable draft."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from wisp_common.config import DistillConfig
from wisp_common.models import load_tokenizer, resolve_model
from wisp_distill.data import work_dir
from wisp_distill.train import layers_in, new_model

log = logging.getLogger("wisp_distill")


def export(config: DistillConfig) -> None:
    checkpoint_path = work_dir(config) / "checkpoint.pt"
    if not checkpoint_path.exists():
        raise SystemExit(f"no checkpoint at {checkpoint_path}: run the train stage first")
    state = torch.load(checkpoint_path)
    model = new_model(config, state["head_ids"], layers_in(state["model"]), tuple(state.get("feature_layers", ())))
    model.load_state_dict(state["model"], strict=False)
    out = Path(config.output)
    model.save(out)
    load_tokenizer(config.target_model).save_pretrained(out)
    record = {"recipe": asdict(config), "steps": state["step"], "held_out_agreement": state["agreement"]}
    started_from = Path(resolve_model(config.init_from)) / "distill.json" if config.init_from else None
    if started_from and started_from.exists():  # the whole lineage of a draft trained in several runs
        record["started_from"] = json.loads(started_from.read_text())
    (out / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("export: draft written to %s (held-out agreement %.3f)", out, state["agreement"])
