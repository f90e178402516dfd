"""Pure functions of Mixture-of-Shards: validity checks, the fixed routing index, and the assembly of the
low-rank factors from the shared pools.

Pools of one projection type (L adapted matrices, parameter budget R, l shards per vector, p private ranks):

    PoolA: (R * L * l, d_in / l)        PoolB: (R * L * l, d_out / l)

The first ``(R - p) * L * l`` shards of each pool are public; matrix ``i`` owns the private block of
``p * l`` shards that follows them, at ``(R - p) * L * l + i * p * l``. Each matrix's index is

    idx_i = concat(randperm(public)[: (r - p) * l], private block of matrix i)      (length r * l)

drawn once from a seeded generator (A and B independently). The factors are

    A_i = PoolA[idxA_i].reshape(r, d_in)          B_i = PoolB[idxB_i].reshape(r, d_out).T
    delta W_i = (alpha / r) * B_i @ A_i

so rank vector ``j`` is the concatenation of shards ``idx[j*l : (j+1)*l]``.
"""

from __future__ import annotations

import math

import torch


def check_divisible(type_key: str, d_in: int, d_out: int, shards_per_vector: int) -> None:
    """Raise unless ``d_in`` and ``d_out`` are both divisible by ``l``."""
    if d_in % shards_per_vector or d_out % shards_per_vector:
        raise ValueError(
            f"MoS needs d_in and d_out divisible by l (shards_per_vector): {type_key} has d_in={d_in}, "
            f"d_out={d_out}, l={shards_per_vector}"
        )


def check_capacity(type_key: str, num_matrices: int, equivalent_rank: int, r: int, private_rank: int) -> None:
    """Raise unless the public part of the pool holds enough vectors: ``(r - p) <= (R - p) * L``."""
    needed, available = r - private_rank, (equivalent_rank - private_rank) * num_matrices
    if needed > available:
        raise ValueError(
            f"MoS needs (r - p) <= (R - p) * L, violated for {type_key}: ({r} - {private_rank}) = {needed} > "
            f"({equivalent_rank} - {private_rank}) * {num_matrices} = {available}; raise equivalent_rank or "
            f"lower r"
        )


def pool_num_shards(num_matrices: int, equivalent_rank: int, shards_per_vector: int) -> int:
    """Shards in each pool of a projection type: ``R * L * l``."""
    return equivalent_rank * num_matrices * shards_per_vector


def routing_indices(
    num_matrices: int,
    *,
    equivalent_rank: int,
    r: int,
    shards_per_vector: int,
    private_rank: int,
    generator: torch.Generator,
    subset_selection: bool = True,
    pair_dissociation: bool = True,
    type_key: str = "this projection type",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed routing of one projection type: two int64 tensors of shape ``(L, r * l)`` (A, then B).

    Row ``i`` lists the pool shards of matrix ``i``: ``(r - p) * l`` public shards (a random subset, or the
    first ones when ``subset_selection`` is off) then the matrix's private block. With ``pair_dissociation``
    off, B reuses A's index. Draws come from ``generator`` in a fixed order (matrix by matrix, A before B).
    ``type_key`` names the projection type in the error raised when ``(r - p) > (R - p) * L``.
    """
    check_capacity(type_key, num_matrices, equivalent_rank, r, private_rank)
    l, p = shards_per_vector, private_rank
    num_public = (equivalent_rank - p) * num_matrices * l
    num_drawn = (r - p) * l

    def public_shards() -> torch.Tensor:
        if subset_selection:
            return torch.randperm(num_public, generator=generator, device="cpu")[:num_drawn]
        return torch.arange(num_drawn, device="cpu")

    rows_a, rows_b = [], []
    for i in range(num_matrices):
        private = torch.arange(p * l, device="cpu") + num_public + i * p * l
        row_a = torch.cat([public_shards(), private])
        rows_a.append(row_a)
        rows_b.append(torch.cat([public_shards(), private]) if pair_dissociation else row_a.clone())
    return torch.stack(rows_a), torch.stack(rows_b)


def init_pools(
    num_shards: int, d_in: int, d_out: int, shards_per_vector: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh float32 pools on the CPU: A uniform in ``(-1/sqrt(d_in), 1/sqrt(d_in))``, B zero (a no-op adapter)."""
    bound = 1.0 / math.sqrt(d_in)
    pool_a = torch.empty(num_shards, d_in // shards_per_vector, dtype=torch.float32, device="cpu")
    pool_a.uniform_(-bound, bound, generator=generator)
    pool_b = torch.zeros(num_shards, d_out // shards_per_vector, dtype=torch.float32, device="cpu")
    return pool_a, pool_b


def assemble(pool_a: torch.Tensor, pool_b: torch.Tensor, index_a: torch.Tensor, index_b: torch.Tensor, r: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The low-rank factors of one matrix: ``A`` (r x d_in) and ``B`` (d_out x r), gathered from the pools."""
    a = pool_a[index_a].reshape(r, -1)
    b = pool_b[index_b].reshape(r, -1).T
    return a, b


def delta_weight(pool_a: torch.Tensor, pool_b: torch.Tensor, index_a: torch.Tensor, index_b: torch.Tensor, r: int,
                 scaling: float) -> torch.Tensor:
    """``delta W = scaling * B @ A`` (d_out x d_in), with ``scaling = alpha / r``."""
    a, b = assemble(pool_a, pool_b, index_a, index_b, r)
    return scaling * (b @ a)
