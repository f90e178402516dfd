"""Linear layers on prepacked oneDNN weights for CPU decoding.

A decoding step multiplies a few dozen rows by every weight matrix of the model. On a CPU the default
``F.linear`` path (MKL on a plain row-major weight) reaches a fraction of the machine's peak at that shape; the
same product on a weight reordered once into oneDNN's blocked layout runs 1.5x (projections) to 3x (the
vocabulary head) faster on the embedded model, in float32 and bfloat16 alike (``benchmarks/rollout.py``). This
is the prepacking PyTorch's own CPU compiler applies to frozen weights; here it is done without compiling.

``PackedLinears.applied(model)`` routes every plain ``nn.Linear`` of the model (adapter layers included: PEFT
wraps plain ``nn.Linear`` modules) through a packed copy of its weight for the duration of the block, by
setting the instance's ``forward`` and removing it afterwards; the model class is never touched. Packed copies
are kept between calls and repacked when a weight changes: the tensor's version counter catches in-place
updates (optimizer steps, ``copy_`` under ``no_grad``) and one sampled element per weight row catches writes
through ``.data`` (which bypass the counter, e.g. PEFT's merge). Packing holds one extra copy of the linear
weights, made on a layer's first call outside autocast (checked per call, since accelerate's mixed precision
turns autocast on inside the model's forward); it applies only on CPU, in float32 or bfloat16. ``Generator(pack_weights=False)``
turns it off.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _row_sample(weight: torch.Tensor) -> torch.Tensor:
    """One element per row, the column moving by one from row to row."""
    rows = torch.arange(weight.shape[0], device=weight.device)
    return weight.detach()[rows, rows % weight.shape[1]]


class _Packed:
    __slots__ = ("weight", "bias", "key", "sample")

    def __init__(self, module: nn.Linear):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
        self.bias = None if module.bias is None else module.bias.detach()
        self.key = _key(module)
        self.sample = _row_sample(module.weight)

    def current(self, module: nn.Linear) -> bool:
        return self.key == _key(module) and torch.equal(self.sample, _row_sample(module.weight))


def _key(module: nn.Linear) -> tuple:
    weight, bias = module.weight, module.bias
    key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype)
    return key if bias is None else (*key, bias.data_ptr(), bias._version)


class PackedLinears:
    """Packed copies of a model's ``nn.Linear`` weights, reused across calls while the weights stay the same."""

    def __init__(self):
        self._packed: dict[nn.Linear, _Packed | None] = {}  # None: this weight cannot be packed

    def _current(self, module: nn.Linear) -> _Packed | None:
        """The module's packed weight, (re)packed if missing or stale."""
        entry = self._packed.get(module)
        if module in self._packed and (entry is None or entry.current(module)):
            return entry
        try:
            with torch.no_grad():
                entry = _Packed(module)
        except RuntimeError as error:  # a oneDNN build without this layout: plain F.linear
            warnings.warn(f"spo.rollout: cannot prepack a {tuple(module.weight.shape)} linear weight ({error}); "
                          "it stays on F.linear", RuntimeWarning, stacklevel=2)
            entry = None
        self._packed[module] = entry
        return entry

    def _forward(self, module: nn.Linear):
        entry = unchecked = object()  # checked against the weight on first use in each block, packed lazily

        def forward(x: torch.Tensor) -> torch.Tensor:
            nonlocal entry
            # autocast may be switched on inside the model's forward (accelerate's mixed precision wraps it)
            if x.dtype != module.weight.dtype or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
                return nn.functional.linear(x, module.weight, module.bias)
            if entry is unchecked:
                entry = self._current(module)
            if entry is None:
                return nn.functional.linear(x, module.weight, module.bias)
            return torch.ops.mkldnn._linear_pointwise(x, entry.weight, entry.bias, "none", [], "")

        return forward

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Inside the block, the model's plain linear layers compute on packed weights (packed on first use, so
        a block run entirely under autocast packs nothing)."""
        modules = [] if not packing_available() else [
            m for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in PACKABLE_DTYPES
            and "forward" not in m.__dict__]
        try:
            for module in modules:
                module.forward = self._forward(module)
            yield
        finally:
            for module in modules:
                module.__dict__.pop("forward", None)
