"""The training configuration: one frozen dataclass, printed at start, saved as config.json, stored in checkpoints."""

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional, Tuple


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the command-line flag."""


# Every setting of one DMD training run. Field names match the `train` flags (`lr_gen` <-> `--lr-gen`).
@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one DMD or DMD2 training run, as one frozen dataclass; `dmd train` builds it from its flags.

    Construct it with keywords. `model_path` (the teacher) and `output_dir` are required, exactly one of `max_steps`
    and `epochs` sets the duration, and the default lambda_reg > 0 also needs the pair file `data_path`. The defaults
    are DMD's CIFAR-10 recipe (batch 56 per process, AdamW lr 5e-5, lambda_reg 0.25 with LPIPS, one fake-score step
    per generator step); `TrainConfig(**resolve_recipe("dmd2", options))` fills the options left None from DMD2's
    instead. Fields are named like their `train` flags (`lr_gen` is `--lr-gen`, described by `dmd train --help`).
    Construction (and `dataclasses.replace`) validates every value, raising ConfigError naming the flag of the first
    one that cannot work. `to_dict`, `from_dict` and `to_json` convert it for config.json and the checkpoints.

    Example:
        cfg = TrainConfig(model_path="edm.pkl", output_dir="runs/x", data_path="pairs.h5", max_steps=200000)
        cfg.lr_gen, cfg.generator_sigmas  # (5e-05, (80.0,))
        TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg  # True
    """

    model_path: str  # teacher EDM or EDM2 pickle: path, file:// or http(s):// URL
    output_dir: str  # run folder: config.json, stats.jsonl, grids, checkpoints
    guide_network: Optional[str] = None  # guiding network: mu_real = D_guide + guidance (D - D_guide); None: none
    guidance: float = 1.0  # guidance weight w of mu_real (EDM2's presets 1.2-2.05); 1 = the teacher alone
    data_path: Optional[str] = None  # pair file (z, y, label) for the regression loss
    batch_size: int = 56  # per process; the global batch is batch_size * world size
    reg_batch_size: Optional[int] = None  # pairs per process and step for the regression loss; None = batch_size
    batch_gpu: Optional[int] = None  # most rows per process and forward/backward; micro-batches add up; None = all
    max_steps: Optional[int] = None  # duration in steps (one G step + its fake steps) ...
    epochs: Optional[int] = None  # ... or in passes over the pair file
    lr_gen: float = 5e-5  # AdamW learning rate of G
    lr_fake: float = 5e-5  # AdamW learning rate of mu_fake
    weight_decay: float = 0.01  # AdamW weight decay, both networks
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW betas, both networks
    grad_clip: float = 10.0  # max gradient norm, both networks
    lambda_dm: float = 1.0  # weight of the distribution-matching loss; 0 = regression only (no mu_fake steps)
    lambda_reg: float = 0.25  # weight of the regression loss; 0 disables it
    regression_distance: str = "lpips"  # 'lpips' (the paper's, VGG-16 at 224x224) or 'mse' (native resolution)
    fake_steps_per_gen: int = 1  # mu_fake updates per G update (DMD2's TTUR uses 5)
    generator_sigmas: Tuple[float, ...] = (80.0,)  # G's noise levels: (80,) = G(z) = D_G(80 z; 80), or a few-step list
    fake_score_levels: str = "all"  # G's samples mu_fake learns: 'all' levels (DMD2) or the 'last' level only
    dropout: float = 0.0  # dropout of G and mu_fake (mu_real always runs in eval mode)
    num_timesteps: int = 1000  # T of the Karras grid
    t_min: float = 0.02  # DM loss draws t uniformly from [t_min T, t_max T)
    t_max: float = 0.98
    fake_sigma_sampling: str = "karras"  # fake-score sigma: 'karras' (uniform grid index) or 'lognormal'
    ema: Tuple[str, ...] = ()  # EMAs of G (parse_ema): half-lives '10kimg' and/or decays per step '0.9999'; () = none
    precision: str = "fp32"  # 'fp32', or 'bf16': the U-Nets run in bf16, weights, losses, optimisers stay fp32
    channels_last: bool = False  # networks in channels-last memory layout (faster convolutions on recent GPUs)
    compile: bool = False  # torch.compile the U-Nets' forward
    fsdp: bool = False  # under torchrun: shard G, mu_fake (and their AdamW states) over the ranks with FSDP2, not DDP
    seed: int = 0  # seeds every random draw of the run
    device: str = "auto"  # 'auto', 'cpu', 'cuda'; under torchrun each rank takes cuda:LOCAL_RANK
    log_every: int = 50  # steps between console lines / stats.jsonl records
    image_every: int = 500  # steps between grid PNGs; 0 = never
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at exit); 0 = only at exit
    keep_last: int = 3  # training states and snapshots to keep; 0 = keep all
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    resume: Optional[str] = None  # 'auto' (latest state in output_dir, if any) or a training-state path
    log_neptune: bool = False  # also log metrics to Neptune (neptune.cfg or NEPTUNE_* env vars)
    log_tensorboard: bool = False  # also write TensorBoard event files into output_dir (the tensorboard package)
    log_wandb: bool = False  # also log to Weights & Biases (the wandb package; WANDB_MODE=offline works offline)
    progress: bool = True  # tqdm bar on stderr (the CLI: only when stderr is a terminal, so logs hold no bar updates)
    lpips_vgg: Optional[str] = None  # LPIPS VGG-16 weights (path/URL); None = the public URL
    lpips_lin: Optional[str] = None  # LPIPS v0.1 linear heads (path/URL); None = the public URL
    lpips_pretrained: bool = True  # False: random LPIPS weights, for tests and smoke runs only
    workers: int = 2  # DataLoader worker processes reading the pair file
    fid_every: int = 0  # steps between FIDs of G (its EMA if any); 0 = never
    fid_num: int = 10000  # one-step images per FID, seeds 0..fid_num-1 labelled seed % label_dim
    fid_ref: Optional[str] = None  # reference statistics: EDM's npz or EDM2's pkl (path/URL); None = EDM's CIFAR-10
    fid_detector: Optional[str] = None  # TorchScript detector (path/URL); None = the Inception-v3 of EDM's protocol
    vae: Optional[str] = None  # a latent teacher's VAE for grids and FID (folder or Hub name); None = its pickle's
    cache_dir: Optional[str] = None  # download cache; None = $DMD_CACHE_DIR or ~/.cache/dmd
    real_data: Optional[str] = None  # DMD2's real data: EDM's image format, or EDM2's encoded latents (dmd/encoded.py)
    xflip: bool = False  # also train the discriminator on the real images mirrored (EDM's x-flip doubling)
    gan_weight_gen: float = 0.0  # weight of G's GAN loss softplus(-f(G(z))) (DMD2: 3e-3); 0 = no GAN
    gan_weight_disc: float = 0.0  # weight of the discriminator loss in the fake-score step (DMD2: 1e-2)
    gan_t_max: float = 1.0  # diffusion-GAN noise index uniform in [0, gan_t_max T) of the Karras grid (DMD2: all of it)
    gan_features: str = "fake"  # the head reads 'fake' (mu_fake's bottleneck, DMD2) or 'teacher' (frozen, FastGen)
    divergence: str = "rkl"  # f-distill's f-divergence of the DM term (dmd/fdistill.py); 'rkl' = DMD2's reverse KL
    fdistill_ratio_ema: float = 0.0  # EMA rate of f-distill's per-noise-bin ratio means (FastGen ImageNet-64: 0.5)
    recipe: str = "dmd"  # the bundle of defaults the unset settings took (RECIPES); recorded, the values decide
    allow_change: Tuple[str, ...] = ()  # settings a resumed run may change from the run's, e.g. ('lr_gen',)

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        from dmd.generator import SigmaError, check_sigmas

        try:
            object.__setattr__(
                self, "generator_sigmas", tuple(check_sigmas(self.generator_sigmas, "--generator-sigmas"))
            )
        except SigmaError as e:
            raise ConfigError(str(e)) from None
        object.__setattr__(self, "allow_change", tuple(field_name(f) for f in self.allow_change))
        object.__setattr__(self, "ema", parse_ema(self.ema))
        self.validate()

    def validate(self):
        """Raise ConfigError naming the flag of the first value that cannot work."""
        checks = [
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (0 <= self.guidance <= 100, "--guidance must be in [0, 100]"),
            (
                self.guidance == 1 or self.guide_network is not None,
                "--guidance needs a guiding network: give --guide-network",
            ),
            (self.reg_batch_size is None or self.reg_batch_size >= 1, "--reg-batch-size must be at least 1"),
            (self.batch_gpu is None or self.batch_gpu >= 1, "--batch-gpu must be at least 1"),
            ((self.max_steps is None) != (self.epochs is None), "give exactly one of --max-steps and --epochs"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.epochs is None or self.epochs >= 1, "--epochs must be at least 1"),
            (self.epochs is None or self.data_path is not None, "--epochs counts passes over --data-path: give it"),
            (self.lambda_reg >= 0 and self.lambda_dm >= 0, "--lambda-reg and --lambda-dm must be >= 0"),
            (self.lambda_reg + self.lambda_dm > 0, "--lambda-reg and --lambda-dm are both 0: nothing to train"),
            (self.regression_distance in ("lpips", "mse"), "--regression-distance must be 'lpips' or 'mse'"),
            (self.lambda_reg == 0 or self.data_path is not None, "--lambda-reg > 0 needs pairs: give --data-path"),
            (self.fake_steps_per_gen >= 1, "--fake-steps-per-gen must be at least 1"),
            (self.fake_score_levels in ("all", "last"), "--fake-score-levels must be 'all' or 'last'"),
            (self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}"),
            (
                (self.gan_weight_gen > 0) == (self.gan_weight_disc > 0),
                "--gan-weight-gen and --gan-weight-disc: both > 0 (GAN on) or both 0",
            ),
            (
                min(self.gan_weight_gen, self.gan_weight_disc) >= 0,
                "--gan-weight-gen and --gan-weight-disc must be >= 0",
            ),
            (self.gan_weight_gen == 0 or self.real_data is not None, "the GAN needs real images: give --real-data"),
            (
                self.gan_weight_gen == 0 or self.lambda_dm > 0,
                "the GAN trains in the fake-score step: it needs --lambda-dm > 0",
            ),
            (
                self.real_data is None or self.gan_weight_gen > 0,
                "--real-data is used by the GAN only: set --gan-weight-gen and --gan-weight-disc (or --recipe dmd2)",
            ),
            (0 < self.gan_t_max <= 1, "--gan-t-max must be in (0, 1]"),
            (self.gan_features in ("fake", "teacher"), "--gan-features must be 'fake' or 'teacher'"),
            (self.gan_features == "fake" or self.gan_weight_gen > 0, "--gan-features teacher needs the GAN on"),
            (self.divergence in DIVERGENCES, f"--divergence must be one of {', '.join(DIVERGENCES)}"),
            (
                self.divergence == "rkl" or self.gan_weight_gen > 0,
                f"--divergence {self.divergence} takes the density ratio from the GAN head: turn the GAN on "
                "(--gan-weight-gen, --gan-weight-disc, --real-data) or use --recipe fdistill",
            ),
            (
                self.divergence == "rkl" or self.batch_gpu is None or self.batch_gpu >= self.batch_size,
                f"--divergence {self.divergence} with --batch-gpu below --batch-size: f-distill's ratio is "
                "normalised over the whole batch, so it needs the batch in one pass",
            ),
            (0 <= self.fdistill_ratio_ema < 1, "--fdistill-ratio-ema must be in [0, 1)"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (0 <= self.t_min < self.t_max <= 1, "--t-min must be below --t-max, both in [0, 1]"),
            (self.fake_sigma_sampling in ("karras", "lognormal"), "--fake-sigma-sampling: 'karras' or 'lognormal'"),
            (self.precision in ("fp32", "bf16"), "--precision must be 'fp32' or 'bf16'"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (min(self.image_every, self.checkpoint_every, self.keep_last) >= 0, "step intervals must be >= 0"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.fid_every >= 0 and self.fid_num >= 2, "--fid-every must be >= 0 and --fid-num at least 2"),
            (self.max_bad_steps >= 1, "--max-bad-steps must be at least 1"),
            (min(self.lr_gen, self.lr_fake, self.grad_clip) > 0, "--lr-gen, --lr-fake, --grad-clip must be > 0"),
            (max(self.lr_gen, self.lr_fake) <= 1, "--lr-gen and --lr-fake must be at most 1 (AdamW learning rates)"),
            (all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "--betas must be two values in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value) and f.name != "grad_clip":
                raise ConfigError(f"{flag_name(f.name)} must be a finite number, not {value}")
        names = {f.name for f in dataclasses.fields(self)}
        for name in self.allow_change:
            if name not in names:
                raise ConfigError(f"--allow-change {flag_name(name)[2:]}: no such setting")
            if name in FREE_ON_RESUME or name in FIXED_ON_RESUME:
                why = "may change on any resume" if name in FREE_ON_RESUME else "cannot change within a run"
                raise ConfigError(f"--allow-change {flag_name(name)[2:]}: that setting {why}")

    def to_dict(self):
        """Return the config as a JSON-serialisable dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        """Build a config from `to_dict()` output (or an older run's, see upgrade_config); unknown keys are an error."""
        d = upgrade_config(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self):
        """Return the config as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


# f-distill's divergences and the weights h(r) of their DM terms (dmd/fdistill.py computes them); rkl is DMD2's own.
DIVERGENCES = {
    "rkl": "1",
    "kl": "r",
    "js": "1 - 1/(1+r)",
    "hellinger": "sqrt(r)",
    "jeffreys": "1 + r",
    "neyman": "1/r",
    "sf": "1/(1+r)",
}


# Resuming a run: settings of duration, I/O, logging, evaluation and hardware may change freely (the paths of the
# teacher and pair file too: the training state checks their contents); these never may, because the state would
# not mean the same (batch: the global batch is checked instead, so a resume may split it over other processes);
# every other setting defines the optimisation and may change only when named in --allow-change.
FREE_ON_RESUME = {
    "model_path", "output_dir", "data_path", "max_steps", "epochs", "device", "log_every", "image_every",
    "checkpoint_every", "keep_last", "max_bad_steps", "resume", "log_neptune", "lpips_vgg", "lpips_lin", "workers",
    "fid_every", "fid_num", "fid_ref", "fid_detector", "cache_dir", "allow_change", "batch_size", "reg_batch_size",
    "batch_gpu", "channels_last", "compile", "fsdp",
}  # fmt: skip
FIXED_ON_RESUME = {"seed", "generator_sigmas", "dropout", "num_timesteps"}
FIXED_ON_RESUME |= {"ema"}  # a training state holds one set of EMAs; another list would start them from nothing
FREE_ON_RESUME |= {"real_data", "recipe", "guide_network"}  # their contents are checked by their fingerprint
FREE_ON_RESUME |= {"log_tensorboard", "log_wandb", "progress"}  # logging only
FREE_ON_RESUME |= {"vae"}  # decodes grids and FID images only; the training itself runs on latents

# Named bundles of defaults for the settings a user leaves unset (`--recipe`); explicit flags override them, and the
# resolved values are what config.json records and resume compares.
RECIPES = {
    # DMD (Yin et al., CVPR 2024) on CIFAR-10: TrainConfig's defaults (lr 5e-5, lambda_reg 0.25 LPIPS, 1:1 updates).
    "dmd": {},
    # DMD2 (Yin et al., NeurIPS 2024), its ImageNet-64 values: no regression (no pairs), TTUR with 5 fake-score
    # updates per G update, the GAN on real images (3e-3 / 1e-2, diffusion-GAN over the whole grid), AdamW lr 2e-6.
    "dmd2": dict(
        lambda_reg=0.0, fake_steps_per_gen=5, gan_weight_gen=3e-3, gan_weight_disc=1e-2, lr_gen=2e-6, lr_fake=2e-6
    ),
}
# f-distill (Xu et al. 2025): DMD2's recipe with the DM term weighted for the Jensen-Shannon divergence (its best).
RECIPES["fdistill"] = dict(RECIPES["dmd2"], divergence="js")


def resolve_recipe(recipe, options):
    """Options for TrainConfig: the unset (None) settings take `recipe`'s value if it has one, else the default."""
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
    resolved = {k: v for k, v in options.items() if v is not None or k not in RECIPE_FIELDS}
    for name, value in RECIPES[recipe].items():
        resolved.setdefault(name, value)
    return dict(resolved, recipe=recipe)


RECIPE_FIELDS = {name for recipe in RECIPES.values() for name in recipe}


# The fields whose flag is not their name (the field keeps the port's name, the flag is the one all commands share).
FLAGS = {"model_path": "--network"}


def flag_name(field):
    """The command-line flag of a config field: lr_gen -> --lr-gen, model_path -> --network."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def field_name(flag):
    """The config field of a flag name as a user writes it: --lr-gen, lr-gen or lr_gen -> lr_gen."""
    name = "--" + flag.strip().lstrip("-")
    return next((field for field, known in FLAGS.items() if known == name), name[2:].replace("-", "_"))


def resume_changes(old, new):
    """Compare a run's config (a dict from a training state) with the config resuming it.

    Return {field: (old, new)} of the changed settings to apply; ConfigError naming the flags of changes the resume
    rules do not allow.
    """
    old = upgrade_config(old)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig.__dataclass_fields__
    current = new.to_dict()
    changes = {}
    for name in sorted(fields):
        before = old.get(name, defaults[name].default)  # A setting added since keeps its default's meaning.
        before = list(before) if isinstance(before, tuple) else before
        if before != current[name]:
            changes[name] = (before, current[name])
    fixed = [flag_name(n) for n in changes if n in FIXED_ON_RESUME]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} cannot change within a run (start a new run instead)")
    refused = [n for n in changes if n not in FREE_ON_RESUME and n not in new.allow_change]
    if refused:
        listed = ", ".join(f"{flag_name(n)} {changes[n][0]} -> {changes[n][1]}" for n in refused)
        names = ",".join(flag_name(n)[2:] for n in refused)
        raise ConfigError(
            f"these settings differ from the run's: {listed}; rerun with the run's values, or pass "
            f"--allow-change {names} to change them from this step on"
        )
    return changes


# The EMAs of G (--ema). An entry is a half-life in thousands of images, '10kimg': beta = 0.5 ** (batch / 10000) per
# step at the run's global batch, as EDM's ema_halflife_kimg (without its ramp-up); or a decay per step in (0, 1),
# '0.9999': beta itself, as NVIDIA FastGen's EMA callback applies its beta once per training iteration. Every EMA is
# G_ema <- beta G_ema + (1 - beta) G after each step (one G update). An entry's normal form is its name: in the
# snapshot file names, the fid_<name> statistics and `generate --ema NAME`.
EMA_KIMG = "kimg"


def _number_text(value):
    """The shortest text that reads back as `value` exactly: 10.0 -> '10', 0.9999 -> '0.9999'."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def parse_ema(entries):
    """The normal form of --ema: a comma-separated string or a sequence of entries (strings or numbers) ->
    a tuple of names such as ('10kimg', '0.9999'); ConfigError naming --ema for a bad or repeated entry."""
    if isinstance(entries, str):
        entries = [e for e in entries.split(",") if e.strip()] if entries.strip() else []
    names = []
    for entry in entries:
        text = str(entry).strip().lower()
        kimg = text.endswith(EMA_KIMG)
        try:
            value = float(text[: -len(EMA_KIMG)] if kimg else text)
        except ValueError:
            value = math.nan
        if kimg and not (0 < value < math.inf):
            raise ConfigError(f"--ema {entry!r}: a half-life must be a positive number of kimg, such as 10kimg")
        if not kimg and not 0 < value < 1:
            raise ConfigError(f"--ema {entry!r}: give a half-life such as 10kimg or a decay per step in (0, 1)")
        names.append(_number_text(value) + (EMA_KIMG if kimg else ""))
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--ema lists {', '.join(repeated)} more than once: each EMA once")
    return tuple(names)


def ema_beta(name, global_batch):
    """The decay per step of the EMA `name` (a parse_ema name) at `global_batch` images per step."""
    if name.endswith(EMA_KIMG):
        return 0.5 ** (global_batch / (float(name[: -len(EMA_KIMG)]) * 1000))
    return float(name)


def upgrade_config(d):
    """A config dict of an older run in today's fields: ema_halflife_kimg X (0 = none) becomes ema ['Xkimg'] (a value
    that is no number stays, for TrainConfig to refuse)."""
    halflife = d.get("ema_halflife_kimg")
    if isinstance(halflife, bool) or not isinstance(halflife, (int, float)):
        return d
    d = dict(d)
    del d["ema_halflife_kimg"]
    if "ema" not in d:
        d["ema"] = [f"{_number_text(halflife)}{EMA_KIMG}"] if halflife else []
    return d
