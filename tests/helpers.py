"""Shared test helpers: tiny random models and a plain target-only reference."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel


def tiny_llama(vocab: int, layers: int = 2, seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    """A random Llama whose logits are spread widely enough that greedy ties are rare."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A draft that agrees with ``model`` on a fraction of tokens that falls with ``scale``."""
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
    return copy


@torch.inference_mode()
def reference_greedy(model: PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    """Target-only greedy decoding, one sequence at a time: the ground truth."""
    cache = DynamicCache()
    logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache).logits[0, -1]
    out: list[int] = []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache).logits[0, -1]
    return out


def save_with_tokenizer(model: PreTrainedModel, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
