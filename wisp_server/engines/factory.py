"""`build_engine`: the one place a `VerificationEngine` is made from the server's config.

The model's path, dtype and device are resolved here, once, and handed to the
engine as plain values, so no engine second-guesses them.
"""

from __future__ import annotations

import importlib.util

from wisp_common.config import ServerConfig
from wisp_server.engines.base import EngineInfo, VerificationEngine


def engine_kind(requested: str) -> str:
    """`auto` means vLLM wherever it can be imported, else the hf backend."""
    if requested != "auto":
        return requested
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def build_engine(config: ServerConfig) -> VerificationEngine:
    import torch
    import transformers

    from wisp_common.models import (
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        resolve_model,
        target_fingerprint,
        tokenizer_fingerprint,
    )

    transformers.utils.logging.disable_progress_bar()
    if config.threads and engine_kind(config.engine) != "vllm":  # vLLM binds its own threads (device_settings)
        torch.set_num_threads(config.threads)
    path = resolve_model(config.target_model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(path)
    info = EngineInfo(
        model_name=config.target_model,
        vocab_size=transformers.AutoConfig.from_pretrained(path).vocab_size,
        eos_token_id=tokenizer.eos_token_id,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        target_fingerprint=target_fingerprint(path),
    )
    if config.engine == "modeled":
        from wisp_server.engines.modeled_engine import ModeledVerificationEngine, load_answers, load_gpu_model

        if not config.answers:
            raise SystemExit("--engine modeled needs --answers: the target's recorded answers (wisp-bench record)")
        return ModeledVerificationEngine(info, load_answers(config.answers), load_gpu_model(config.gpu_model))
    if engine_kind(config.engine) == "vllm":
        from wisp_server.engines.vllm_engine import VllmVerificationEngine

        return VllmVerificationEngine(config, info, path, dtype, device)
    from wisp_common.models import load_causal_lm
    from wisp_server.engines.hf_engine import HFVerificationEngine

    return HFVerificationEngine(load_causal_lm(path, dtype, device), info)
