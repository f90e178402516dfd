import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_flush_denormal(True)

SHARED_DATA = Path(os.environ.get("SPO_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data folder {SHARED_DATA} is missing (set SPO_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct model and tokenizer (converted once per machine)."""
    from spo.models import EMBEDDED_MODEL, load_model, load_tokenizer

    return load_model(EMBEDDED_MODEL).eval(), load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from spo.models import EMBEDDED_MODEL, load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny random model saved with the embedded tokenizer, for runs that load a model from a folder."""
    from spo.models import tiny_model

    path = tmp_path_factory.mktemp("tiny")
    tiny_model(seed=5).save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path
