"""Spectral algorithms: pure tensor functions, device-agnostic, each returning certified bounds."""

from lipcheck.spectral.conv import (
    ConvGeometry,
    circular_conv_norm,
    circular_embedding_bound,
    conv_operator_norm,
    conv_transpose_operator_norm,
    reshaped_kernel_norm,
)
from lipcheck.spectral.dense import SpectralBound, dense_sigma_max, gram_iteration_bound

__all__ = [
    "ConvGeometry",
    "SpectralBound",
    "circular_conv_norm",
    "circular_embedding_bound",
    "conv_operator_norm",
    "conv_transpose_operator_norm",
    "dense_sigma_max",
    "gram_iteration_bound",
    "reshaped_kernel_norm",
]
