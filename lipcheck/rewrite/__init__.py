"""Rewriting models so that their Lipschitz constant is under control (spectral normalization)."""
