"""lipcheck: certified upper bounds on the l2 Lipschitz constant of neural networks."""

__version__ = "0.1.0"
