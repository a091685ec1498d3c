"""GAAM's Gaussian reweighting (Ioannides, Chadha, Elkins, 2024): the weights in closed form
(:func:`gaussian_weights`, stable in low precision), their reference as the literal product of densities
(:func:`naive_gaussian_weights`) and the paper's Importance Factor (:func:`importance_factor`)."""

from headwise.ops.gaussian.gaussian import gaussian_weights, importance_factor
from headwise.ops.gaussian.naive import naive_gaussian_weights

__all__ = ["gaussian_weights", "naive_gaussian_weights", "importance_factor"]
