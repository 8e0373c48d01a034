"""Target features on the wire: half floats, row by row (proto message `TargetFeatures`)."""

from __future__ import annotations

import torch

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb


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
