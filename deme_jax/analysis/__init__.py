"""Figures behind the paper's argument: gradient conflict between timestep intervals, loss landscapes."""

from deme_jax.analysis.gradient_conflict import cosine_matrix, gradient_conflict, interval_gradients, plot_conflict
from deme_jax.analysis.landscape import filter_normalized_direction, landscape, plot_landscape

__all__ = ["cosine_matrix", "filter_normalized_direction", "gradient_conflict", "interval_gradients", "landscape",
           "plot_conflict", "plot_landscape"]
