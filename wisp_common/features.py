"""Target features on the wire: half floats, row by row (proto message `TargetFeatures`)."""

from __future__ import annotations

import torch

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb


def unit_rms(rows: torch.Tensor) -> torch.Tensor:
    """A decoder layer's output as a feature row carries it (`OpenSession.feature_layers`): each row scaled to unit
    root mean square. The residual stream grows with depth; this keeps every layer at one scale, and in float16."""
    rows = rows.float()
    return rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6)


def feature_rows(last_hidden: torch.Tensor, hidden_states, layers: tuple[int, ...]) -> torch.Tensor:
    """Rows as a verdict carries them, from transformers' outputs: the last hidden state, then each of decoder
    ``layers``' outputs at unit RMS (``hidden_states[k + 1]`` is layer k's output)."""
    return torch.cat([last_hidden.float(), *(unit_rms(hidden_states[k + 1]) for k in layers)], -1)


def computed_feature_rows(model, ids: list[int], layers: tuple[int, ...]) -> torch.Tensor:
    """The rows verdicts would carry for every position of ``ids``, computed by a transformers causal LM in one
    pass (call under `torch.inference_mode`)."""
    out = model.model(input_ids=torch.tensor([ids]), output_hidden_states=bool(layers))
    return feature_rows(out.last_hidden_state[0], [h[0] for h in out.hidden_states or ()], layers)


def encode_features(position: int, features: torch.Tensor) -> pb.TargetFeatures:
    rows, dim = features.shape
    data = features.to(torch.float16).contiguous().numpy().tobytes()
    return pb.TargetFeatures(position=position, rows=rows, dim=dim, float16=data)


def decode_features(message: pb.TargetFeatures) -> torch.Tensor:
    """A float32 tensor of shape (rows, dim)."""
    if len(message.float16) != 2 * message.rows * message.dim:
        raise ValueError(f"features of {message.rows}x{message.dim} need {2 * message.rows * message.dim} bytes")
    flat = torch.frombuffer(bytearray(message.float16), dtype=torch.float16)
    return flat.view(message.rows, message.dim).float()
