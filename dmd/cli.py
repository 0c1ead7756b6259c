"""Command-line interface: `python -m dmd <command> --help`.

Each command parses and validates its options, builds a config and calls into the module that does the work.
Commands live here, one function each; the work itself lives in the module named in each docstring.
"""

import click

from dmd import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dmd")
def main():
    """Distill an EDM diffusion model into a one-step generator with Distribution Matching Distillation."""


# ----------------------------------------------------------------------------
# Commands are added below, one block each (see each module for the work).
