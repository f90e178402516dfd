"""Configuration of Mixture-of-Shards (MoS) LoRA adapters.

Notation used throughout the package (see ``docs/ALGORITHMS.md`` section 10):

* ``R``  equivalent rank: the parameter budget, expressed as the rank of a plain LoRA with the same number
  of trainable parameters (``MoSConfig.equivalent_rank``);
* ``r``  active rank of every adapted matrix (``MoSConfig.r``);
* ``l``  shards per vector (``MoSConfig.shards_per_vector``);
* ``p``  private rank: rank vectors per matrix built only from shards no other matrix uses
  (``MoSConfig.private_rank``);
* ``L``  number of adapted matrices of one projection type (one per layer), known only once the adapter
  is placed on a model.

Trainable parameters per projection type: ``R * L * (d_in + d_out)``, exactly a rank-``R`` LoRA's count,
whatever ``r``, ``l`` and ``p`` are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "MOS"


@dataclass
class MoSConfig(PeftConfig):
    """Configuration of a Mixture-of-Shards adapter; pass it to ``peft.get_peft_model``.

    Every adapted matrix ``W`` (``d_out x d_in``) gets ``W x + (lora_alpha / r) * B A dropout(x)`` where the
    rows of ``A`` (``r x d_in``) and the columns of ``B`` (``d_out x r``) are concatenations of ``l`` shards
    gathered, through a fixed seeded index, from two pools shared by all layers of the same projection type.

    The four differentiation strategies are switches so that each can be ablated; switching one off keeps
    the parameter count (the pools keep their size):

    * ``subset_selection`` off: every matrix uses the same public vectors (the first ``r - p`` of the pool)
      instead of a random subset;
    * ``pair_dissociation`` off: ``B`` uses ``A``'s index instead of an independent one;
    * ``vector_sharding`` off: shards are whole vectors (behaves as ``shards_per_vector=1``);
    * ``shard_privatization`` off: no private block (behaves as ``private_rank=0``).

    Validity: ``p <= R``, ``p <= r``, ``(r - p) <= (R - p) * L``, and ``d_in``, ``d_out`` divisible by ``l``
    (the last two are checked when the adapter is placed on a model).
    """

    r: int = field(default=8, metadata={"help": "Active rank r of every adapted matrix."})
    equivalent_rank: int = field(
        default=2,
        metadata={
            "help": "Parameter budget R, as the rank of a plain LoRA with the same number of trainable parameters: "
            "each projection type gets pools of R * L * (d_in + d_out) parameters for its L matrices."
        },
    )
    shards_per_vector: int = field(
        default=2, metadata={"help": "l: each rank vector is the concatenation of l shards of length d / l."}
    )
    private_rank: int = field(
        default=1, metadata={"help": "p: rank vectors per matrix made of shards private to that matrix."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (suffixes) of the nn.Linear modules to adapt, a regex, or 'all-linear'. Modules with the "
            "same last name component (q_proj, gate_proj, ...) form one projection type and share one pool pair."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "Scaling numerator: delta W = (lora_alpha / r) B A."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    seed: int = field(default=0, metadata={"help": "Seed of the routing indices and of the pool initialisation."})
    subset_selection: bool = field(default=True, metadata={"help": "Each matrix draws a random subset of vectors."})
    pair_dissociation: bool = field(default=True, metadata={"help": "A and B draw independent indices."})
    vector_sharding: bool = field(default=True, metadata={"help": "Vectors are concatenations of l shards."})
    shard_privatization: bool = field(default=True, metadata={"help": "Each matrix owns a block of p private ranks."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save (e.g. a new head)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType(PEFT_TYPE_NAME)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        for name in ("r", "equivalent_rank", "shards_per_vector"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoSConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.private_rank, int) or self.private_rank < 0:
            raise ValueError(f"MoSConfig.private_rank must be a non-negative integer, got {self.private_rank!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"MoSConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        p, r, big_r = self.effective_private_rank, self.r, self.equivalent_rank
        if p > big_r:
            raise ValueError(f"MoS needs p <= R (private_rank <= equivalent_rank), got p={p} > R={big_r}")
        if p > r:
            raise ValueError(f"MoS needs p <= r (private_rank <= r), got p={p} > r={r}")

    @property
    def effective_shards_per_vector(self) -> int:
        """``l`` as used: 1 when vector sharding is switched off."""
        return self.shards_per_vector if self.vector_sharding else 1

    @property
    def effective_private_rank(self) -> int:
        """``p`` as used: 0 when shard privatization is switched off."""
        return self.private_rank if self.shard_privatization else 0
