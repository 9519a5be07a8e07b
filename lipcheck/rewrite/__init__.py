"""Rewrites: models changed by lipcheck (spectral normalization), which check themselves afterwards."""
