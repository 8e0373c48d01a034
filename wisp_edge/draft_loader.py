"""`drafter_factory`: the draft model named in the config, loaded once, as a drafter per session."""

from __future__ import annotations

from collections.abc import Callable

from wisp_common.eagle import is_eagle_model, load_eagle_model
from wisp_common.models import load_causal_lm, resolve_device, resolve_model
from wisp_common.request import SamplingParams
from wisp_edge.drafter import Drafter, ModelDrafter
from wisp_edge.eagle import EagleDrafter
from wisp_edge.lookup import PromptLookup
from wisp_edge.suffix import SuffixDecoding


def drafter_factory(
    name: str,
    sampling: SamplingParams = SamplingParams(),
    dtype: str = "float32",
    device: str = "auto",
    lookup: PromptLookup | None = None,
    suffix: SuffixDecoding | None = None,
    draft_probabilities: bool = True,
) -> Callable[[], Drafter]:
    """Loads a draft model once; each call makes a drafter over it (one per device, sharing the weights; with
    ``suffix``, each drafter keeps its own device history).

    Feature-conditioned (EAGLE-style) if the model's directory says so, else a standalone causal LM.
    """
    path, device = resolve_model(name), resolve_device(device)
    if is_eagle_model(path):
        eagle = load_eagle_model(path, dtype, device)
        return lambda: EagleDrafter(
            eagle, sampling, lookup, None if suffix is None else suffix.decoder(), draft_probabilities
        )
    model = load_causal_lm(path, dtype, device)
    return lambda: ModelDrafter(
        model, sampling, lookup, None if suffix is None else suffix.decoder(), draft_probabilities
    )
