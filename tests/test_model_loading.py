"""Loading models from several threads at once, as a server and its in-process edges do in tests and tools."""

from __future__ import annotations

import threading
from pathlib import Path

from helpers import tiny_llama
from transformers import PreTrainedModel

from wisp_common.models import load_causal_lm


def test_concurrent_loads_leave_weight_tying_working(tmp_path: Path) -> None:
    """transformers swaps class attributes while it loads; overlapping loads once left tying off process-wide.

    A tied model loaded afterwards then kept its head on the meta device ("Cannot copy out of meta tensor").
    """
    untied, tied = tmp_path / "untied", tmp_path / "tied"
    tiny_llama(512, layers=1).save_pretrained(untied)
    tiny_llama(512, layers=1, tied=True).save_pretrained(tied)
    original = PreTrainedModel.tie_weights
    for _ in range(5):
        threads = [threading.Thread(target=load_causal_lm, args=(str(untied),)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert PreTrainedModel.tie_weights is original
    model = load_causal_lm(str(tied))
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
