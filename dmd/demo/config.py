"""The demo's settings: frozen dataclasses built by `python -m dmd demo` and `demo train-teacher` (no torch import)."""

import dataclasses
from dataclasses import dataclass

from dmd.demo import SHIPPED_TEACHER

GRID_COLUMNS = 20  # Images per method in grid.png (classes 0..9 twice), so --num-eval must reach it.


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message names the option or file at fault."""


class DemoInterrupted(RuntimeError):
    """A signal stopped the demo; what it finished is kept, and the same command continues from there."""


# Every setting of one demo run. The defaults fit an idle 2-core CPU in a few minutes (README: measured times);
# `--full` (FULL below) trains longer and evaluates more samples.
@dataclass(frozen=True)
class DemoConfig:
    output_dir: str = "runs/demo"  # pairs, real digits, the students' training runs, grids, results.md/.json
    teacher: str = str(SHIPPED_TEACHER)  # EDM pickle of the digits teacher
    seed: int = 0  # seeds the judge and the training runs; the pair and evaluation seeds are fixed lists
    num_pairs: int = 1000  # teacher pairs (seeds 0..num_pairs-1, classes cycling) for the regression loss
    max_steps: int = 300  # training steps (G updates) of each student
    batch_size: int = 16  # generated images (and pairs, and real digits) per step
    lr_gen: float = 5e-5  # AdamW learning rate of G (DMD's CIFAR-10 value)
    lr_fake: float = 2e-3  # AdamW learning rate of mu_fake and the GAN head: fast, so mu_fake tracks G's samples
    fake_steps_per_gen: int = 1  # mu_fake updates per G update
    lambda_reg: float = 2.0  # weight of the MSE regression loss in the DMD run (MSE is ~10x smaller than LPIPS)
    regression_distance: str = "mse"  # distance of G(z_ref) to y_ref (VGG LPIPS cannot run here: see the README)
    gan_weight_gen: float = 0.03  # DMD2 students: weight of G's GAN loss (DMD2's 3e-3 is for 100k+ steps)
    gan_weight_disc: float = 1.0  # DMD2 students: weight of the discriminator loss (DMD2's: 1e-2)
    two_step: bool = False  # also distil DMD2's two-step generator (levels 80 and two_step_sigma)
    two_step_sigma: float = 0.5  # the DMD2 two-step generator's second noise level
    fdistill: bool = False  # also distil f-distill (DMD2 with the JS weights h(r) of the GAN head's density ratio)
    num_eval: int = 1000  # samples per method for FID and accuracy (classes cycling)
    progress: bool = True  # progress bars of the pair sampling and of the students' training

    def __post_init__(self):
        checks = [
            (self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.fake_steps_per_gen >= 1, "--fake-steps-per-gen must be at least 1"),
            (self.num_pairs >= self.batch_size, "--num-pairs must be at least --batch-size"),
            (self.num_eval >= GRID_COLUMNS, f"--num-eval must be at least {GRID_COLUMNS}"),
            (0 < self.lr_gen <= 1 and 0 < self.lr_fake <= 1, "--lr-gen and --lr-fake must be in (0, 1]"),
            (self.lambda_reg > 0, "--lambda-reg must be positive (the DMD run uses the regression loss)"),
            (min(self.gan_weight_gen, self.gan_weight_disc) > 0, "--gan-weight-gen and --gan-weight-disc must be > 0"),
            (0 < self.two_step_sigma < 80, "--two-step-sigma must be in (0, 80)"),
        ]
        for ok, message in checks:
            if not ok:
                raise DemoError(message)

    def to_dict(self):
        """Return the config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


# What --full changes: longer training, the two-step and f-distill students, twice the evaluation samples (README).
FULL = dict(max_steps=1000, num_eval=2000, two_step=True, fdistill=True)


# How the shipped teacher was trained: EDM's recipe (Adam, lr warm-up, EMA with ramp-up) sized for 1,797 digits, with
# dmd.demo.SHIPPED_TEACHER_THREADS torch threads.
@dataclass(frozen=True)
class TeacherConfig:
    seed: int = 0  # seeds the initial weights, batches, noise and dropout
    kimg: float = 150  # training duration in thousands of images
    batch_size: int = 128
    lr: float = 2e-3  # Adam learning rate after the warm-up
    lr_rampup_kimg: float = 10  # linear learning-rate warm-up, in thousands of images
    ema_halflife_kimg: float = 10  # EDM's EMA half-life ...
    ema_rampup_ratio: float = 0.05  # ... capped at this fraction of the images seen so far

    def __post_init__(self):
        if min(self.kimg, self.batch_size, self.lr) <= 0:
            raise DemoError("--kimg, --batch-size and --lr must be positive")

    def to_dict(self):
        """Return the config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)
