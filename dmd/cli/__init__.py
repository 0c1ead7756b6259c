"""Command-line interface: `python -m dmd <command> --help` (also `dmd <command>` once installed).

Each command parses and validates its options, builds a config and calls into the module that does the work; one
file per family of commands (pairs, train, sample, demo), the shared option parts in options.py. Options follow
EDM's conventions: one name per idea across commands (--network, --output-dir, --batch-size, --steps for sampler
steps), old spellings kept as hidden aliases, help texts from the config dataclasses' comments.
"""

import click

from dmd import __version__


class OneLineUsageError(click.ClickException):
    """A usage error (bad option value, unknown option or command) as one `Error:` line that names the help to read."""

    exit_code = 2


# `dmd fid` alone shows its help through this usage error (click >= 8.2; older click shows it without one).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class MainGroup(click.Group):
    """click's group with usage errors on one line instead of click's usage, hint and error lines."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _NO_ARGS_IS_HELP:
            raise
        except click.UsageError as e:
            path = e.ctx.command_path if e.ctx is not None else ctx.command_path
            raise OneLineUsageError(f"{e.format_message()} (see '{path} --help')") from e


@click.group(
    cls=MainGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 118},
)
@click.version_option(__version__, prog_name="dmd")
def main():
    """Distill an EDM diffusion model into a one-step (or few-step) generator with DMD or DMD2."""


# The commands register themselves on `main` when their modules are imported.
from dmd.cli import dataset, demo, export, pairs, sample, train  # noqa: E402, F401
