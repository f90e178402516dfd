"""Peak memory of one learner pass (forward and backward) over a long sequence: the chunked vocabulary head of the
packed path against full logits.

The embedded SmolLM2-135M-Instruct (vocabulary 49,152), one sequence of ``--tokens`` tokens (a 64-token prompt and
the rest completion), float32. Variants, each in its own process (peak resident memory is per process):
- ``padded``: the padded path (``completion_logprobs``), the model's own ``[tokens x vocabulary]`` logits;
- ``full_logits``: the packed path with the head in one piece (``[tokens x vocabulary]`` logits materialised);
- ``chunked``: the packed path as the learner runs it, the head evaluated in chunks of positions
  (``HEAD_CHUNK_ELEMENTS``) that are recomputed in the backward pass.
Prints the peak resident memory each pass adds to the loaded model, and the ratios to ``chunked``.

    python benchmarks/memory.py [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = 64
VARIANTS = ("padded", "full_logits", "chunked")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def one_pass(variant: str, tokens: int) -> dict:
    import torch

    from spo.models import EMBEDDED_MODEL, load_model, setup_cpu_math
    from spo.trainer.logprobs import HEAD_CHUNK_ELEMENTS, completion_logprobs, packed_logprobs
    from spo.trainer.packing import pack
    from spo.trainer.samples import collate

    setup_cpu_math()
    model = load_model(EMBEDDED_MODEL).float()
    ids = torch.randint(100, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts, completions = [ids[:PROMPT]], [ids[PROMPT:]]
    batch = collate(prompts, completions, 0) if variant == "padded" else pack(prompts, completions)
    before = peak_rss_mib()
    if variant == "padded":
        logp = completion_logprobs(model, batch, 1.0)
    else:
        logp = packed_logprobs(model, batch, 1.0, chunk_elements=1 << 62 if variant == "full_logits" else
                               HEAD_CHUNK_ELEMENTS)
    logp.sum().backward()
    return {"variant": variant, "tokens": tokens, "loaded_mib": before, "pass_mib": peak_rss_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement (a child process)
    options = parser.parse_args()
    if options.variant:
        print(json.dumps(one_pass(options.variant, options.tokens)))
        return
    results = {}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(options.tokens)],
                               capture_output=True, text=True, check=True)
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"\nOne forward + backward pass over {options.tokens} tokens, embedded model, float32 "
          f"(peak resident memory added to the loaded model)")
    for variant in VARIANTS:
        print(f"{variant:<12}{results[variant]['pass_mib']:>10.0f} MiB")
    for variant in VARIANTS[:-1]:
        ratio = results[variant]["pass_mib"] / results["chunked"]["pass_mib"]
        print(f"chunked head: {ratio:.2f}x less than {variant}")


if __name__ == "__main__":
    main()
