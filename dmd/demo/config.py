"""The demo's settings: frozen dataclasses built by `python -m dmd demo` and `demo train-teacher` (no torch import)."""

import dataclasses
from dataclasses import dataclass

from dmd.demo import SHIPPED_TEACHER

GRID_COLUMNS = 20  # Images per method in grid.png (classes 0..9 twice), so --num-eval must reach it.


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message names the option or file at fault."""


class DemoInterrupted(RuntimeError):
    """A signal stopped the demo; what it finished is kept, and the same command continues from there."""


# Every setting of one demo run. The defaults fit an idle 2-core CPU in under 10 minutes.
@dataclass(frozen=True)
class DemoConfig:
    output_dir: str = "runs/demo"  # pairs, the three training runs, grids, results.md / results.json
    teacher: str = str(SHIPPED_TEACHER)  # EDM pickle of the digits teacher
    seed: int = 0  # seeds the judge and the training runs; the pair and evaluation seeds are fixed lists
    num_pairs: int = 1000  # teacher pairs (seeds 0..num_pairs-1, classes cycling) for the regression loss
    steps: int = 250  # training steps of each student
    batch_size: int = 32  # generated images per step (and pairs per step for the regression loss)
    lr: float = 5e-4  # AdamW learning rate of G and mu_fake
    fake_steps_per_gen: int = 5  # mu_fake steps per G step (DMD2's TTUR; 1:1 lets mu_fake lag G here)
    lambda_reg: float = 2.0  # weight of the MSE regression loss in the DMD run (MSE is ~10x smaller than LPIPS)
    regression_distance: str = "mse"  # distance of G(z_ref) to y_ref (VGG LPIPS cannot run here: see the README)
    num_eval: int = 1000  # samples per method for FID and accuracy (classes cycling)
    progress: bool = True  # tqdm bar of the pair sampling (training always shows its own bar)

    def __post_init__(self):
        checks = [
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.fake_steps_per_gen >= 1, "--fake-steps-per-gen must be at least 1"),
            (self.num_pairs >= self.batch_size, "--num-pairs must be at least --batch-size"),
            (self.num_eval >= GRID_COLUMNS, f"--num-eval must be at least {GRID_COLUMNS}"),
            (self.lr > 0, "--lr must be positive"),
            (self.lambda_reg > 0, "--lambda-reg must be positive (the DMD run uses the regression loss)"),
        ]
        for ok, message in checks:
            if not ok:
                raise DemoError(message)

    def to_dict(self):
        """Return the config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


# How the shipped teacher was trained: EDM's recipe (Adam, lr warm-up, EMA with ramp-up) sized for 1,797 digits.
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
            raise DemoError("--kimg, --batch and --lr must be positive")

    def to_dict(self):
        """Return the config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)
