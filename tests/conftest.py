import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_flush_denormal(True)

# The full data sets (GSM8K train/test, MATH-500) live next to the repository in ../shared/data on our machines and
# in CI, not in a user's clone. Tests that only need a few rows use the small data sets written for this project
# in the same format, in tests/fixtures/ (see tests/fixtures/README.md); the checks that need the whole data sets
# take the `shared_data` fixture.
SHARED_DATA = Path(os.environ.get("SPO_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full data sets. Without them the test is skipped with the reason, except in CI (``CI=true``), where the
    data is provisioned: there a missing folder fails the test, so CI can never silently skip the full-data checks."""
    if not SHARED_DATA.is_dir():
        message = f"../shared/data not found; set SPO_TEST_DATA (looked in {SHARED_DATA})"
        if running_in_ci():
            pytest.fail(f"{message}; CI must run the full-data checks")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """Small data sets shipped with the tests, written for this project in the format of the real ones:
    ``gsm8k/test.jsonl``, ``math500/test.jsonl`` (20 rows each, same layout and fields as ../shared/data)."""
    return FIXTURES


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
