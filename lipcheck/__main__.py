"""``python -m lipcheck``."""

from lipcheck.cli import main

main()
