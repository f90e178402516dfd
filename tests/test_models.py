import pytest
import torch

from spo.models import (EMBEDDED_MODEL, embedded_model_path, has_native_bfloat16, load_model, resolve_model_path,
                        tiny_model)


def test_embedded_model_is_cached_as_safetensors_and_reloads(embedded):
    model, tokenizer = embedded
    path = embedded_model_path()
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    assert resolve_model_path(EMBEDDED_MODEL) == str(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_key_value_heads == 3 and model.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "5" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])  # the real model, not random weights


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tiny_models_are_deterministic(family):
    a, b = tiny_model(family, seed=1), tiny_model(family, seed=1)
    x = torch.tensor([[1, 5, 9]])
    assert torch.equal(a(x).logits, b(x).logits)
    assert not torch.equal(a(x).logits, tiny_model(family, seed=2)(x).logits)


def test_bad_dtype_and_missing_path_are_clear(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(EMBEDDED_MODEL, dtype="float8")
    with pytest.raises(OSError):
        load_model(str(tmp_path / "no-such-model"))


def test_native_bfloat16_on_this_cpu_follows_its_instruction_set():
    """What ``bf16: auto`` and ``rollout_dtype: auto`` decide on CPU: bfloat16 only with AVX512-BF16 or AMX."""
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs /proc/cpuinfo (Linux) to read the CPU's flags")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert has_native_bfloat16("cpu") == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert has_native_bfloat16("meta") is False
