"""`hf` backend: the target model through transformers, with exact per-session KV.

Each session keeps its own per-layer key/value tensors. A round left-pads the
sessions' caches to a common length, right-pads their new tokens, and runs
one forward pass with an attention mask that hides the padding; positions are
given explicitly so each session sees its own. Afterwards each session keeps
exactly the KV of its committed prefix, so nothing is ever recomputed.

This backend runs wherever transformers does; the vLLM backend replaces the
copying with a paged cache.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from wisp_common.features import feature_rows
from wisp_common.request import SamplingParams
from wisp_common.verification import verify
from wisp_server.engines.base import (
    EngineInfo,
    RoundRequest,
    RoundVerdict,
    VerificationEngine,
    check_feature_layers,
)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape [1, heads, tokens, dim]


@dataclass
class _Session:
    sampling: SamplingParams
    generator: torch.Generator | None
    pending: list[int]  # committed tokens whose KV is not cached yet
    features: bool  # whether verdicts carry the target's features
    feature_layers: tuple[int, ...]  # decoder layers whose outputs follow the last hidden state in each row
    kv: KV | None = None
    cached: int = 0  # tokens in kv


class HFVerificationEngine(VerificationEngine):
    name = "hf"
    pads_batches = True

    def __init__(self, model: PreTrainedModel, info: EngineInfo):
        self.model = model
        self.info = info
        self.device = next(model.parameters()).device
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def add_session(
        self,
        session_id: str,
        context: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        features: bool = False,
        known_features: int = 0,  # no prefix cache: every position is computed, with its features
        feature_layers: tuple[int, ...] = (),
    ) -> None:
        if not context:
            raise ValueError("a session needs at least one context token")
        check_feature_layers(feature_layers, self.model.config.num_hidden_layers)
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device)
            if sampling.seed:
                generator.manual_seed(sampling.seed)
            else:
                generator.seed()
        with self._lock:
            self._sessions[session_id] = _Session(sampling, generator, list(context), features, tuple(feature_layers))

    def remove_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def uncached_tokens(self, session_id: str) -> int:
        with self._lock:
            return len(self._sessions[session_id].pending)

    @torch.inference_mode()
    def verify(self, batch: Sequence[RoundRequest]) -> list[RoundVerdict]:
        with self._lock:
            sessions = [self._sessions[r.session_id] for r in batch]
        inputs = [s.pending + list(r.drafts) for s, r in zip(sessions, batch)]
        past = max(s.cached for s in sessions)
        width = max(len(x) for x in inputs)
        rows = len(batch)

        input_ids = torch.zeros(rows, width, dtype=torch.long)
        mask = torch.zeros(rows, past + width, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        for i, (s, tokens) in enumerate(zip(sessions, inputs)):
            input_ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, past - s.cached : past + len(tokens)] = 1
            positions[i] = torch.arange(s.cached, s.cached + width)
        cache = DynamicCache(ddp_cache_data=self._padded_cache(sessions, past)) if past else None

        hidden = self.model.base_model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=any(s.feature_layers for s in sessions),
        )
        # Only the rows at the drafts' positions go through the (large) output head.
        starts = [len(s.pending) - 1 for s in sessions]
        picked = torch.cat([hidden.last_hidden_state[i, start : len(inputs[i])] for i, start in enumerate(starts)])
        logits = self.model.get_output_embeddings()(picked)

        results: list[RoundVerdict] = []
        offset = 0
        new_cache = hidden.past_key_values
        for i, (s, r) in enumerate(zip(sessions, batch)):
            n_rows = len(r.drafts) + 1
            result = verify(logits[offset : offset + n_rows], r.drafts, s.sampling, s.generator, r.proposals)
            offset += n_rows
            keep = len(s.pending) + result.num_accepted  # new tokens whose KV stays valid
            features = None
            if s.features:
                layers = [] if hidden.hidden_states is None else [h[i, :keep] for h in hidden.hidden_states]
                features = feature_rows(hidden.last_hidden_state[i, :keep], layers, s.feature_layers)
            s.kv = [
                (
                    layer.keys[i : i + 1, :, past - s.cached : past + keep].clone(),
                    layer.values[i : i + 1, :, past - s.cached : past + keep].clone(),
                )
                for layer in new_cache.layers
            ]
            s.cached += keep
            s.pending = [result.next_token]
            results.append(RoundVerdict(result.num_accepted, result.next_token, features))
        return results

    @staticmethod
    def _padded_cache(sessions: Sequence[_Session], past: int) -> KV:
        """Stacks the sessions' KV into one batch, left-padded with zeros to ``past`` tokens."""
        reference = next(s.kv for s in sessions if s.kv is not None)
        layers: KV = []
        for layer, (ref_k, _) in enumerate(reference):
            empty = ref_k[:, :, :0]  # a session's first round has no KV yet
            keys, values = [], []
            for s in sessions:
                k, v = s.kv[layer] if s.kv is not None else (empty, empty)
                pad = past - s.cached
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        return layers
