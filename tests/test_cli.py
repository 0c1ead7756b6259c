"""The command line's own behaviour: every command's --help, and usage errors as one `Error:` line."""

import pytest
from click.testing import CliRunner

from dmd.cli import main

COMMANDS = [
    "make-pairs",
    "convert-pairs",
    "make-dataset",
    "train",
    "generate",
    "fid calc",
    "fid ref",
    "plot",
    "demo",
    "export",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = CliRunner().invoke(main, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ") and "Examples:" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        # `train` alone used to end in a TypeError traceback (the required --output-dir got a dataclass sentinel).
        ([], "Missing option '--network'. (see 'main train --help')"),
        (["--network", "t.pkl"], "Missing option '--output-dir'. (see 'main train --help')"),
        (
            ["--network", "t.pkl", "--output-dir", "run", "--lr-gen", "1e39"],
            "Invalid value for '--lr-gen': 1e+39 is not in the range 0<x<=1. (see 'main train --help')",
        ),
        (["--bogus"], "No such option '--bogus'. (see 'main train --help')"),
    ],
)
def test_train_usage_errors_are_one_line(args, message):
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert result.output == f"Error: {message}\n"


def test_sampler_range_is_checked_before_any_work(tmp_path):
    args = ["generate", "--network", "n.pkl", "--output-dir", str(tmp_path / "out"), "--steps", "4"]
    result = CliRunner().invoke(main, [*args, "--sigma-min", "90", "--sigma-max", "80"])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.output == "Error: --sigma-min 90.0 must be below --sigma-max 80.0 (see 'main generate --help')\n"


def test_hidden_alias_missing_is_named_as_help_shows_it():
    result = CliRunner().invoke(main, ["generate"])
    assert result.exit_code == 2
    assert result.output == "Error: Missing option '--network'. (see 'main generate --help')\n"


def test_unknown_command_is_one_line_with_a_suggestion():
    result = CliRunner().invoke(main, ["trian"])
    assert result.exit_code == 2
    assert result.output == "Error: No such command 'trian'. Did you mean 'train'? (see 'main --help')\n"


@pytest.mark.parametrize("group, command", [([], "train"), (["fid"], "calc")])
def test_no_command_shows_the_help(group, command):
    result = CliRunner().invoke(main, group)
    assert result.output.startswith("Usage: ") and "Commands:" in result.output and command in result.output


@pytest.mark.parametrize(
    "args, flag",
    [
        (["fid", "ref", "--data", ".", "--dest"], "'--dest'"),
        (["demo", "train-teacher", "--out"], "'--out'"),
        (["convert-pairs", "MINE"], "'NEW'"),  # OLD may be any file,
    ],
)
def test_commands_never_overwrite_an_existing_output_file(tmp_path, args, flag):
    """fid ref and demo train-teacher used to overwrite the file after their work (a downloaded reference, a
    teacher); each now refuses before any work and leaves the file as it was."""
    mine = tmp_path / "mine.bin"
    mine.write_bytes(b"a person's file")
    result = CliRunner().invoke(main, [str(mine) if a == "MINE" else a for a in args] + [str(mine)])
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: Invalid value for {flag}: {mine} exists; remove it or choose another")
    assert result.output.count("\n") == 1 and mine.read_bytes() == b"a person's file"


def test_sampler_option_defaults_are_edm_samplers():
    import inspect

    from dmd.cli.options import SAMPLER_DEFAULTS
    from dmd.edm.sampler import edm_sampler

    signature = inspect.signature(edm_sampler).parameters
    assert SAMPLER_DEFAULTS == {name: signature[name].default for name in SAMPLER_DEFAULTS}
    help_text = CliRunner().invoke(main, ["generate", "--help"]).output
    assert "[default: 0.002; x>0]" in help_text and "[default: inf; x>=0]" in help_text
