"""What an edge tells the server of its draft, which the server checks before a session opens."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from wisp_common.eagle import trained_for
from wisp_common.models import resolve_model, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb


def draft_identity(draft_model: str, tokenizer: PreTrainedTokenizerBase) -> pb.ModelIdentity:
    """The draft's tokenizer and, for a feature-conditioned draft, the target weights it was trained for (the
    server refuses a draft made for other weights of the same tokenizer)."""
    return pb.ModelIdentity(
        name=draft_model,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        target_fingerprint=trained_for(resolve_model(draft_model)),
    )
