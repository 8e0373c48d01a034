"""The draft model's format: a draft conditioned on the target's features (EAGLE: Li et al., ICML 2024,
arXiv 2401.15077). The edge drafts with it and the trainer (`wisp_distill`) writes it, so it lives here.

A standalone small draft has to guess the target's next token from the text
alone. This one also reads the target's *feature* f_i: its last hidden state
at position i, which the server computes anyway while verifying and sends
back with each verdict. At position i the draft combines f_i with the
embedding of token x_{i+1}, runs its decoder layers (EAGLE's one, or more:
`wisp-distill --draft-layers`) over all such pairs so far, and predicts the
feature at position i+1; the target's own output head (restricted to a
trimmed vocabulary, so it stays cheap) turns that prediction into a
distribution for x_{i+2}. Further drafts feed the predicted features back
in, until the next verdict brings the real ones.

The input embedding and output head are the target's. The draft carries
its own copy of them in float16 (the whole embedding, and the head's rows
for its trimmed vocabulary where the target does not tie the two), so an
edge never needs the target's checkpoint: a Jetson cannot hold a 32B model
to read a few rows from it. Beside them it stores its fusion layer, decoder
layers, a norm, the ids of its head's vocabulary, and in its config the
fingerprint of the target weights it was trained for
(`wisp_common.models.target_fingerprint`), which the server checks.

A draft may also read some of the target's lower decoder layers (EAGLE-3: Li
et al., arXiv 2503.01840, fuses a low, a middle and the top layer). Its
`feature_layers` name them; the server then appends their outputs, each at
unit RMS, to every feature row it sends, and the draft adds `fusion` of them
to the top feature before anything else reads it. The draft's own predicted
features have no such layers and pass through unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel

MODEL_TYPE = "wisp-eagle"
FORMAT = 2  # 1: embedding and head read from the target's checkpoint; 2: carried in the draft
STORED_DTYPE = torch.float16  # the carried embedding and head rows
HEAD_ROWS = "head_rows"  # stored only where the target's head is not its embedding
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The carried embedding, in shards of at most this size: a large target's embedding (about 1 GB) and even a small
# one's would otherwise make one file too large for git hosting.
EMBEDDING_SHARD = "embedding-{:03d}.safetensors"
EMBEDDING_SHARDS = "embedding-*.safetensors"
EMBEDDING_SHARD_BYTES = 32 << 20
DECODER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "hidden_act",
)


class EagleDraftModel(nn.Module):
    """fc([embed(x_{i+1}), f_i]) -> Llama decoder layer(s) -> norm: the predicted feature f_{i+1}."""

    def __init__(
        self,
        target: str,
        decoder: dict,
        embedding: torch.Tensor,
        head_rows: torch.Tensor | None,
        head_ids: torch.Tensor,
        layers: int = 1,
        target_fingerprint: str = "",
        feature_layers: tuple[int, ...] = (),
    ):
        """``head_rows``: the target's output head at ``head_ids``, or None where it ties head and embedding;
        ``feature_layers``: the target's decoder layers (0-based) the draft reads beside its last hidden state."""
        super().__init__()
        self.target = target
        self.target_fingerprint = target_fingerprint
        self.tied_head = head_rows is None
        hidden = embedding.shape[1]
        self.embed = nn.Embedding.from_pretrained(embedding, freeze=True)
        self.register_buffer("head_ids", head_ids.long())
        head = embedding[head_ids.long()] if head_rows is None else head_rows
        self.register_buffer("head", head.clone(), persistent=False)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.feature_layers: tuple[int, ...] = ()
        if feature_layers:
            self.add_feature_layers(tuple(feature_layers))
        self.decoder_config = dict(decoder)
        # Tokens come in through the target's embedding, so the decoder's own vocabulary is a placeholder.
        special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        self.decoder = LlamaModel(LlamaConfig(vocab_size=1, num_hidden_layers=layers, **special, **self.decoder_config))

    @property
    def layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def hidden(self) -> int:
        return self.embed.weight.shape[1]

    @property
    def feature_width(self) -> int:
        """The width of a feature row the server sends this draft: the top layer's, then each feature layer's."""
        return self.hidden * (1 + len(self.feature_layers))

    def add_feature_layers(self, layers: tuple[int, ...]) -> None:
        """Reads the target's decoder ``layers`` too, through a fusion that starts at zero: the draft predicts
        exactly what it did without them until training teaches it to use them."""
        if self.feature_layers:
            raise ValueError(f"the draft already reads layers {list(self.feature_layers)}")
        self.feature_layers = tuple(layers)
        self.fusion = nn.Linear(len(layers) * self.hidden, self.hidden, bias=False).to(self.fc.weight)
        nn.init.zeros_(self.fusion.weight)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """Rows as the server sends them -> the feature the decoder reads; rows of the top layer alone (the
        draft's own predictions) pass through."""
        if features.shape[-1] == self.hidden:
            return features
        if features.shape[-1] != self.feature_width:
            raise ValueError(f"feature rows {features.shape[-1]} wide; this draft reads {self.feature_width}")
        return features[..., : self.hidden] + self.fusion(features[..., self.hidden :])

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        cache: DynamicCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` [batch, n, hidden] and ``tokens`` [batch, n] -> predicted features and head logits.

        ``attention_mask``: None is causal; a boolean [1, 1, n, cached + n] says which keys each query sees."""
        fused = self.fc(torch.cat([self.embed(tokens), self.fuse(features)], dim=-1))
        out = self.decoder(
            inputs_embeds=fused,
            position_ids=position_ids,
            past_key_values=cache,
            attention_mask=attention_mask,
            use_cache=True,
        )
        predicted = out.last_hidden_state
        return predicted, predicted @ self.head.T

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "model_type": MODEL_TYPE,
            "format": FORMAT,
            "target": self.target,
            "target_fingerprint": self.target_fingerprint,
            "tied_head": self.tied_head,
            "layers": self.layers,
            "feature_layers": list(self.feature_layers),
            "decoder": self.decoder_config,
        }
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        weights = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k != "embed.weight"}
        if not self.tied_head:
            weights[HEAD_ROWS] = self.head.detach().to(STORED_DTYPE).contiguous()
        save_file(weights, path / WEIGHTS_FILE)
        embedding = self.embed.weight.detach().to(STORED_DTYPE)
        rows = max(1, EMBEDDING_SHARD_BYTES // (embedding.shape[1] * embedding.element_size()))
        for stale in path.glob(EMBEDDING_SHARDS):
            stale.unlink()
        for index, shard in enumerate(embedding.split(rows)):
            save_file({"embed.weight": shard.contiguous()}, path / EMBEDDING_SHARD.format(index))


def decoder_config_of(target_config) -> dict:
    """The draft's decoder layer has the target's shapes."""
    return {name: getattr(target_config, name) for name in DECODER_FIELDS if hasattr(target_config, name)}


def target_output_layers(target: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's input embedding and output head (None where tied), read without loading the rest."""
    from safetensors import safe_open

    path = target_checkpoint(target)
    found: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                if key in handle.keys():
                    found[key] = handle.get_tensor(key).float()
    if "model.embed_tokens.weight" not in found:
        raise ValueError(f"{target}: no model.embed_tokens.weight in its safetensors files (a Llama-style target?)")
    return found["model.embed_tokens.weight"], found.get("lm_head.weight")


def target_checkpoint(target: str) -> Path:
    """The target's local checkpoint directory: a WISP model name, a path, or a HuggingFace id (downloaded)."""
    from wisp_common.models import resolve_model

    path = Path(resolve_model(target))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(target, allow_patterns=["*.json", "*.safetensors"]))
    return path


def is_eagle_model(path: str | Path) -> bool:
    config = Path(path) / CONFIG_FILE
    return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def trained_for(path: str | Path) -> str:
    """The fingerprint of the target weights a draft was trained for; "" for any other kind of model."""
    config = Path(path) / CONFIG_FILE
    return json.loads(config.read_text()).get("target_fingerprint", "") if is_eagle_model(path) else ""


def features_read(path: str | Path) -> tuple[int, ...] | None:
    """What a draft asks the server for: None for a draft that reads no target features, else the decoder layers
    it reads beside the top one (often none)."""
    if not is_eagle_model(path):
        return None
    return tuple(json.loads((Path(path) / CONFIG_FILE).read_text()).get("feature_layers", ()))


def load_eagle_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> EagleDraftModel:
    """The draft alone: it carries the target's embedding and head rows, so no target checkpoint is read."""
    from safetensors.torch import load_file

    from wisp_common.models import torch_dtype

    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format", 1) < FORMAT:
        raise ValueError(
            f"{path}: a draft from before drafts carried the target's embedding; "
            "export it again from its work directory: wisp-distill --stage export"
        )
    weights = load_file(path / WEIGHTS_FILE)
    shards = sorted(path.glob(EMBEDDING_SHARDS))
    embedding = torch.cat([load_file(shard)["embed.weight"] for shard in shards]).float()
    head_rows = weights.pop(HEAD_ROWS).float() if HEAD_ROWS in weights else None
    model = EagleDraftModel(
        config["target"],
        config["decoder"],
        embedding,
        head_rows,
        weights["head_ids"],
        config["layers"],
        config["target_fingerprint"],
        tuple(config.get("feature_layers", ())),
    )
    weights["embed.weight"] = embedding
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a {MODEL_TYPE} checkpoint ({e})") from e
    return model.to(device=device, dtype=torch_dtype(dtype, device)).eval()
