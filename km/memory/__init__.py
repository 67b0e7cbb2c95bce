"""Memory modules for Kanerva Machine models (plain torch)."""

from km.memory.dynamic import DynamicMemory, solve_addresses
from km.memory.kanerva import (
    KanervaMemory,
    MemoryState,
    NonPositiveDefiniteError,
    kl_isotropic,
    kl_matrix_normal,
    log_prob_matrix_normal,
    read,
    safe_cholesky,
    sample,
    write_batched,
    write_online,
    write_with_kl,
)
from km.memory.product import ProductMemory, weighted_write

__all__ = [
    "ProductMemory",
    "weighted_write",
    "DynamicMemory",
    "solve_addresses",
    "KanervaMemory",
    "MemoryState",
    "NonPositiveDefiniteError",
    "kl_isotropic",
    "kl_matrix_normal",
    "log_prob_matrix_normal",
    "read",
    "safe_cholesky",
    "sample",
    "write_batched",
    "write_online",
    "write_with_kl",
]
