"""The parts every command's --help is made of: options in titled sections, one visible name per option (old
spellings accepted as hidden aliases), help texts taken from the config dataclasses' own comments, Examples blocks,
and the option families several commands share (device, cache, EDM's sampler settings).
"""

import dataclasses
import inspect
import io
import os
import sys
import tokenize

import click


def field_comments(config):
    """{field: its inline comment} of a dataclass written as `name: type = default  # comment` lines."""
    source = inspect.getsource(config)
    comments, line_tokens = {}, []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NEWLINE, tokenize.NL):
            if len(line_tokens) >= 2 and line_tokens[0].type == tokenize.NAME and line_tokens[1].string == ":":
                comment = next((t.string for t in line_tokens if t.type == tokenize.COMMENT), None)
                if comment is not None and line_tokens[0].start[1] == 4:  # a field of the class body
                    comments[line_tokens[0].string] = comment.lstrip("# ").strip()
            line_tokens = []
        elif token.type not in (tokenize.INDENT, tokenize.DEDENT):
            line_tokens.append(token)
    return comments


# An option of a titled --help section; only its first long name is shown, the others are hidden aliases (the old
# spellings, kept so that no script breaks).
class Option(click.Option):
    def __init__(self, *args, section="Options", **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section

    def get_help_record(self, ctx):
        opts = self.opts
        self.opts = opts[:1]  # show the first name alone
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts

    def get_error_hint(self, ctx):
        return f"'{self.opts[0]}'"  # errors name the option as --help shows it


def option(*decls, section="Options", **kwargs):
    """click.option with a --help section."""
    return click.option(*decls, cls=Option, section=section, **kwargs)


# --help that lists options by section, in the order the sections first appear, then the examples.
class _Sectioned:
    def __init__(self, *args, examples=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples = examples

    def format_options(self, ctx, formatter):
        sections = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument):  # named in the usage line and the command's text
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "section", "Other options"), []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)
        if isinstance(self, click.Group):
            self.format_commands(ctx, formatter)

    def format_epilog(self, ctx, formatter):
        if self.examples:
            with formatter.section("Examples"):
                for line in self.examples.strip("\n").splitlines():  # as written: commands must not be rewrapped
                    formatter.write(f"{' ' * formatter.current_indent}{line}\n" if line else "\n")
        super().format_epilog(ctx, formatter)


class Command(_Sectioned, click.Command):
    """A click command with sectioned --help and an Examples block (`examples=`)."""


class Group(_Sectioned, click.Group):
    """A click group (a command with subcommands) with sectioned --help and an Examples block."""


def new_file(ctx, param, value):
    """Callback of an option or argument naming a file to create: refuse one that exists, or a name the filesystem
    cannot hold, before any work, so that a file a person made (a downloaded reference, a teacher) is never
    overwritten and hours of work never end in a name that cannot be written."""
    if value is not None and os.path.lexists(value):
        raise click.BadParameter(f"{value} exists; remove it or choose another path")
    return output_path(ctx, param, value)


def output_path(ctx, param, value):
    """Callback of an option naming a file or folder to write: refuse, before any work, a name longer than its
    filesystem takes (255 bytes on most)."""
    from dmd.utils.io import check_name_length

    if value is not None:
        try:
            check_name_length(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


def resolve_progress(ctx, param, value):
    """--progress/--no-progress left unset: bars only when stderr is a terminal, so that logs of batch jobs and
    redirected runs hold no bar updates."""
    return sys.stderr.isatty() if value is None else value


def progress_option(what="Progress bars"):
    return option(
        "--progress/--no-progress",
        default=None,
        callback=resolve_progress,
        section="I/O",
        show_default=False,
        help=f"{what} on stderr.  [default: on when stderr is a terminal]",
    )


POSITIVE = click.FloatRange(min=0, min_open=True)
COUNT = click.IntRange(min=1)


def sentence(text):
    """A config comment as a help sentence: capitalised (unless it starts with a symbol like mu_fake), one period."""
    text = text if "_" in text.split(" ", 1)[0] else text[:1].upper() + text[1:]
    return text if text.endswith((".", "]")) else text + "."


def default_of(config, name):
    """The default of a config dataclass field, so --help shows the value the config really uses."""
    return config.__dataclass_fields__[name].default


def config_option(config, flag, *aliases, field=None, section, help=None, **kwargs):
    """An option for the `config` field named like `flag` (--lr-gen -> lr_gen, or `field`), in a --help section: its
    default is the field's, its help text the field's comment in config.py unless `help` is given."""
    name = field or flag[2:].replace("-", "_")
    text = help or field_comments(config)[name]
    if default_of(config, name) is not dataclasses.MISSING:  # a field without one (the run folder) is required
        kwargs.setdefault("default", default_of(config, name))
    return option(flag, *aliases, name, section=section, help=sentence(text), **kwargs)


def float_list(ctx, param, value):
    """Parse '80' or '80,1.5' into a tuple of floats (None stays None)."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from e


def device_option(section="Performance"):
    return option(
        "--device",
        default="auto",
        section=section,
        metavar="auto|cpu|cuda[:N]",
        help="Where to run; torchrun ranks use their local GPU.",
    )


def batch_option(help, default=256):
    """--batch-size (old spelling --batch): items per network call or step, per process."""
    return option(
        "--batch-size", "--batch", "batch_size", default=default, type=COUNT, metavar="INT", section="Performance",
        help=help,
    )  # fmt: skip


def detector_option():
    return option(
        "--detector",
        default=None,
        metavar="PATH|URL",
        section="Main",
        show_default=False,
        help="TorchScript feature detector, called as detector(uint8 images (N, 3, H, W), return_features=True) "
        "-> (N, D) features; give a local copy when offline.  [default: EDM's Inception-v3, downloaded once]",
    )


def vae_option():
    return option(
        "--vae",
        metavar="DIR|NAME",
        section="I/O",
        show_default=False,
        help="A latent network's VAE (EDM2 img512): a folder saved with save_pretrained or a Hugging Face name.  "
        "[default: the name its file records, stabilityai/sd-vae-ft-mse]",
    )


def ema_option(section="Main"):
    """--ema of the commands that load a network: which of a training state's (or run folder's) networks."""
    return option(
        "--ema",
        metavar="NAME",
        section=section,
        show_default=False,
        help="A training state's or run folder's EMA of G by its `train --ema` name (e.g. 0.9999 or 10kimg), or "
        "'none' for G itself.  [default: the run's first EMA; G where it kept none]",
    )


def metrics_options():
    """--metrics and --dinov2 of `fid ref` and `fid calc`: which Frechet distances, one pass over the images."""
    return stacked(
        [
            option(
                "--metrics",
                default="fid",
                metavar="LIST",
                section="Main",
                help="Comma-separated metrics, computed in one pass: fid (Inception-v3) and fd_dinov2 (EDM2's DINOv2 "
                "ViT-L/14, needs pip install 'dmd-distill[dinov2]').",
            ),
            option(
                "--dinov2",
                default=None,
                metavar="DIR|NAME",
                section="Main",
                show_default=False,
                help="fd_dinov2's model: a folder written by transformers' save_pretrained or a Hugging Face Hub name "
                "(downloaded once into the cache); give a folder when offline.  [default: facebook/dinov2-large]",
            ),
        ]
    )


def cache_option():
    return option(
        "--cache-dir",
        type=click.Path(file_okay=False),
        section="I/O",
        metavar="DIR",
        help="Download cache for URLs.  [default: $DMD_CACHE_DIR or ~/.cache/dmd]",
        show_default=False,
    )


# EDM's sampler defaults (those of dmd.edm.sampler.edm_sampler, which a test compares), the options' defaults.
SAMPLER_DEFAULTS = dict(
    sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0
)


def stacked(decorators):
    """One decorator applying `decorators` as if written one above the other, in that order."""

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def sampler_options(steps_default, steps_help):
    """EDM's sampler settings (its generate.py's flags), shared by make-pairs, generate and fid calc."""
    section = "EDM sampler"
    decorators = [
        option(
            "--steps",
            "num_steps",
            default=steps_default,
            type=click.IntRange(min=2),
            section=section,
            metavar="INT",
            help=steps_help,
        ),
        option(
            "--sigma-min",
            default=SAMPLER_DEFAULTS["sigma_min"],
            type=POSITIVE,
            section=section,
            metavar="FLOAT",
            help="Lowest noise level (raised to the network's own).",
        ),
        option(
            "--sigma-max",
            default=SAMPLER_DEFAULTS["sigma_max"],
            type=POSITIVE,
            section=section,
            metavar="FLOAT",
            help="Highest noise level (lowered to the network's own).",
        ),
        option(
            "--rho",
            default=SAMPLER_DEFAULTS["rho"],
            type=POSITIVE,
            section=section,
            metavar="FLOAT",
            help="Time step exponent.",
        ),
        option(
            "--S-churn",
            "S_churn",
            default=SAMPLER_DEFAULTS["S_churn"],
            type=click.FloatRange(min=0),
            section=section,
            metavar="FLOAT",
            help="Stochasticity strength (0: the deterministic sampler).",
        ),
        option(
            "--S-min",
            "S_min",
            default=SAMPLER_DEFAULTS["S_min"],
            type=click.FloatRange(min=0),
            section=section,
            metavar="FLOAT",
            help="Stochasticity: lowest sigma.",
        ),
        option(
            "--S-max",
            "S_max",
            default=SAMPLER_DEFAULTS["S_max"],
            type=click.FloatRange(min=0),
            section=section,
            metavar="FLOAT",
            help="Stochasticity: highest sigma.",
        ),
        option(
            "--S-noise",
            "S_noise",
            default=SAMPLER_DEFAULTS["S_noise"],
            type=float,
            section=section,
            metavar="FLOAT",
            help="Stochasticity: noise inflation.",
        ),
    ]
    return stacked(decorators)


def guide_options(section="EDM sampler"):
    """--guide-network and --guidance: a guided teacher D_guide + w (D - D_guide), EDM2's autoguidance or
    classifier-free guidance."""
    decorators = [
        option(
            "--guide-network",
            default=None,
            metavar="PATH|URL",
            section=section,
            show_default=False,
            help="Guiding network: every teacher call is D_guide + w (D - D_guide); a smaller conditional network "
            "(autoguidance) or the unconditional one (classifier-free guidance).  [default: none]",
        ),
        option(
            "--guidance",
            default=1.0,
            type=click.FloatRange(min=0, max=100),
            metavar="FLOAT",
            section=section,
            help="Guidance weight w (EDM2's presets: 1.2-2.05); 1 = the teacher alone.",
        ),
    ]
    return stacked(decorators)


def sampler_kwargs_of(num_steps, sampler):
    """EDM sampler kwargs for generate / fid calc: none for one-step sampling, where they would be ignored; a
    --guide-network path goes as `guide` (loaded by the command once the network is, see generate.load_guide)."""
    guide, guidance = sampler.pop("guide_network", None), sampler.pop("guidance", 1.0)
    if num_steps is None:
        changed = [f"--{k.replace('_', '-')}" for k, v in sampler.items() if v != SAMPLER_DEFAULTS[k]]
        changed += ["--guide-network"] if guide is not None else []
        changed += ["--guidance"] if guidance != 1 else []
        if changed:
            raise click.UsageError(f"{', '.join(changed)} set EDM's sampler: give --steps N to sample with it")
        return {}
    if not sampler["sigma_min"] < sampler["sigma_max"]:
        raise click.UsageError(f"--sigma-min {sampler['sigma_min']} must be below --sigma-max {sampler['sigma_max']}")
    if guide is None and guidance != 1:
        raise click.UsageError(f"--guidance {guidance} needs a guiding network: give --guide-network")
    return dict(sampler, guide=guide, guidance=guidance) if guide is not None else sampler
