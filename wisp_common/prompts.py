"""Prompts: read from files (plain JSONL, MT-Bench question files, ShareGPT-style dumps) and encoded as token ids."""

from __future__ import annotations

import json
from pathlib import Path


def prompt_of(record: dict) -> str | None:
    """A record's first-turn prompt, in any of the formats `load_prompts` reads."""
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    if isinstance(record.get("turns"), list) and record["turns"]:  # MT-Bench: first turn
        return record["turns"][0]
    for turn in record.get("conversations", []):  # ShareGPT: first human turn
        if turn.get("from") in ("human", "user"):
            return turn.get("value")
    return None


def load_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """First-turn prompts from a JSONL file (``prompt``, ``turns`` or ``conversations``) or a ShareGPT JSON list."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    prompts = [p for p in map(prompt_of, records) if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts found (expected 'prompt', 'turns' or 'conversations' fields)")
    return prompts[:limit]


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids, wrapped in the model's chat template when ``chat`` and it has one."""
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)
