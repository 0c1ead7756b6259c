"""`python -m dmd ...` runs the command-line interface."""

from dmd.cli import main

main()
