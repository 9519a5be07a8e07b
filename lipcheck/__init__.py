"""lipcheck: certified upper bounds on the l2 Lipschitz constant of neural networks."""

__version__ = "0.1.0"
# The project's public home: SARIF output names it as the tool's informationUri. Replace it when the
# repository's final address is known (it must stay an absolute URI).
__url__ = "https://github.com/lipcheck/lipcheck"
