"""Model merging over parameter pytrees: task vectors, task arithmetic, TIES, DARE."""

from deme_jax.merge.task_vectors import METHODS, merge, task_vectors, weight_groups

__all__ = ["METHODS", "merge", "task_vectors", "weight_groups"]
