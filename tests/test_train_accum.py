"""Gradient accumulation (--batch-gpu): a step in micro-batches makes the update of the whole batch at once, on one
process and under 2-process DDP, and a bad --batch-gpu is one line naming the flag.

The step tests build a DMD2 run with every part on (GAN, MSE regression, two fake-score steps, a two-step generator
at its level 1, so backward simulation too) on the tiny fixture teacher, and step it with plain SGD (lr 1): the
weight change is then minus the clipped gradient itself, comparable to float-sum precision (Adam's first step,
lr times the gradient's sign, would turn float noise in near-zero gradients into whole steps).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_train import assert_same_updates, initial_head_state, load_network_state

from dmd.cli import main
from dmd.config import ConfigError, TrainConfig, resume_changes

ROOT = Path(__file__).resolve().parents[1]
TEACHER = Path(__file__).parent / "fixtures" / "edm_ddpmpp_cond.pkl"  # EDMPrecond + SongUNet, 8x8, label_dim 10
B, B_REF = 8, 6  # generated images and pairs per step: uneven, so some micro-batches hold fewer pairs, or none


def level_one_step(cfg):
    """The first step whose generator step trains G at level 1 (its input made by G itself)."""
    from dmd.batches import draw_index

    return next(s for s in range(20) if draw_index(cfg.seed, s, "level", len(cfg.generator_sigmas)) == 1)


def one_step(tmp_path, pairs, real, batch_gpu):
    """Build the DMD2 run's parts with --batch-gpu `batch_gpu`, make one generator and one fake-score update with
    SGD; return the step's losses and every trained network's weight change."""
    from dmd.build import build_parts, build_regression, load_teacher, open_datasets, open_stream
    from dmd.steps import fake_score_step, generator_step

    cfg = TrainConfig(
        model_path=str(TEACHER),
        output_dir=str(tmp_path / "run"),
        data_path=str(pairs),
        real_data=str(real),
        batch_size=B,
        reg_batch_size=B_REF,
        batch_gpu=batch_gpu,
        max_steps=1,
        lambda_reg=0.25,
        regression_distance="mse",
        fake_steps_per_gen=2,
        gan_weight_gen=0.3,  # DMD2's 3e-3 and 1e-2 times 100: the GAN's share of the update is then well above noise
        gan_weight_disc=1.0,
        generator_sigmas=(80.0, 1.5),
        device="cpu",
        workers=0,
    )
    device = torch.device("cpu")
    mu_real, teacher, _ = load_teacher(cfg, device)
    pair_data, real_data = open_datasets(cfg, mu_real)
    streams = [open_stream(d, b, "--batch-size", "items", cfg, device) for d, b in ((pair_data, B_REF), (real_data, B))]
    parts, _ = build_parts(cfg, mu_real, teacher, build_regression(cfg, device), *streams, device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # mu_fake as after some training: a copy of mu_real would make the DM loss exactly 0
        for w in parts.mu_fake.parameters():
            w.add_(1e-2 * torch.randn(w.shape, generator=g))
    parts.opt_G = torch.optim.SGD(parts.G.parameters(), lr=1.0, fused=True)
    parts.opt_fake = torch.optim.SGD(parts.fake_params, lr=1.0, fused=True)
    nets = dict(G=parts.G, mu_fake=parts.mu_fake, head=parts.head)
    before = {name: [w.detach().clone() for w in net.parameters()] for name, net in nets.items()}
    step = level_one_step(cfg)
    gen = generator_step(parts, step)
    loss_fake, loss_disc, norm_fake, _ = fake_score_step(parts, step, gen)
    stats = {**gen.losses, "loss_fake": loss_fake, "loss_disc": loss_disc, "norm_G": gen.norm, "norm_fake": norm_fake}
    changes = {
        name: torch.cat([(w - w0).flatten() for w, w0 in zip(net.parameters(), before[name])])
        for name, net in nets.items()
    }
    return {k: float(v) for k, v in stats.items()}, changes, gen


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A pair file of 6 pairs and 16 real images, shared by the step tests (read-only)."""
    from conftest import write_pairs

    from dmd.images import write_image_dataset

    folder = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (16, 8, 8, 3), generator=g, dtype=torch.uint8).numpy()
    write_image_dataset(folder / "real.zip", images, labels=torch.arange(16) % 10)
    return write_pairs(folder / "pairs.h5", B_REF), folder / "real.zip"


@pytest.fixture(scope="module")
def whole_batch(tmp_path_factory, data):
    return one_step(tmp_path_factory.mktemp("whole"), *data, batch_gpu=None)


@pytest.mark.parametrize("batch_gpu", [2, 3])  # 2: the last micro-batch has no pairs; 3: 8 = 3 + 3 + 2 images
def test_micro_batches_make_the_whole_batch_update(tmp_path, data, whole_batch, batch_gpu):
    stats, changes, gen = one_step(tmp_path, *data, batch_gpu=batch_gpu)
    stats_whole, changes_whole, gen_whole = whole_batch
    assert all(stats_whole[k] > 0 for k in ("loss_dm", "loss_reg", "loss_gan", "loss_fake", "loss_disc"))
    assert stats == pytest.approx(stats_whole, rel=1e-5)
    # The weight changes agree to float32 rounding of the weights (~1e-7 on weights of size ~1, where changes are
    # ~1e-2 and below: 5e-6 of the change's norm seen); a micro-batch's loss scaled wrong would be off by its share.
    for name, change in changes.items():
        assert 0 < (change - changes_whole[name]).norm() < 5e-5 * changes_whole[name].norm(), name
    # What the step leaves for the fake-score step and the grids: the same images, assembled from the micro-batches.
    torch.testing.assert_close(gen.x, gen_whole.x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gen.pairs[0], gen_whole.pairs[0], rtol=1e-5, atol=1e-6)
    for k in ("p_real", "p_fake"):
        torch.testing.assert_close(gen.aux[k], gen_whole.aux[k], rtol=1e-5, atol=1e-6)


def test_a_batch_gpu_of_the_whole_batch_changes_nothing(tmp_path, data, whole_batch):
    stats, changes, _ = one_step(tmp_path, *data, batch_gpu=B)  # one micro-batch: today's code path, bit for bit
    assert stats == whole_batch[0]
    assert all(torch.equal(changes[name], whole_batch[1][name]) for name in changes)


def test_bad_batch_gpu_is_one_line_naming_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--batch-gpu must be at least 1"):
        TrainConfig(model_path="t.pkl", output_dir="run", max_steps=1, lambda_reg=0, batch_gpu=0)
    args = ["train", "--network", str(TEACHER), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    result = CliRunner().invoke(main, [*args, "--lambda-reg", "0", "--batch-gpu", "0"])
    assert result.exit_code == 2 and "Invalid value for '--batch-gpu': 0 is not in the range x>=1" in result.output
    assert not (tmp_path / "run").exists()


def test_batch_gpu_may_change_on_resume():
    """It changes how a step is computed, not what: a resumed run may use another value (another GPU, say)."""
    old = TrainConfig(model_path="t.pkl", output_dir="run", max_steps=1, lambda_reg=0)
    new = TrainConfig(**{**old.to_dict(), "batch_gpu": 4})
    assert resume_changes(old.to_dict(), new) == {"batch_gpu": (None, 4)}


def test_two_process_ddp_with_micro_batches_matches_one_process(tmp_path, data):
    """Under DDP, G's and mu_fake's gradients are reduced once per update (no_sync before the last micro-batch) and
    the GAN head's averaged after it: 2 processes of 2 rows in micro-batches of 1 make one process's update of 4.

    The real images are 16 copies of one: a rank's real rows are other rows of the epoch's order than one process's
    (DistributedSampler deals them out in turn), so with distinct images their diffusion-GAN noise would differ.
    """
    from dmd.images import write_image_dataset

    pairs, _ = data
    real = tmp_path / "same.zip"
    write_image_dataset(real, np.full((16, 8, 8, 3), 200, np.uint8), labels=np.full(16, 3))
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", "--network", TEACHER, "--device", "cpu", "--workers", 0, "--log-every", 1, "--image-every", 0]
    args += ["--recipe", "dmd2", "--real-data", real, "--data-path", pairs, "--lambda-reg", 0.25, "--max-steps", 1]
    args += ["--regression-distance", "mse", "--fake-steps-per-gen", 2, "--gan-weight-gen", 0.3, "--lr-gen", 5e-5]
    args = [str(a) for a in args + ["--gan-weight-disc", 1, "--lr-fake", 5e-5]]  # lr: the DDP tests' (test_train.py)
    result = CliRunner().invoke(main, [*args, "--output-dir", str(one), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    cmd = ddp + args + ["--output-dir", str(two), "--batch-size", "2", "--batch-gpu", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = ([json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()] for run in (one, two))
    keys = ("loss_G", "loss_dm", "loss_reg", "loss_gan", "loss_fake", "loss_disc", "grad_norm_G", "grad_norm_fake")
    assert all(a[0][k] > 0 for k in keys if k != "loss_dm")  # mu_fake starts as mu_real: no DM gradient yet
    np.testing.assert_allclose([b[0][k] for k in keys], [a[0][k] for k in keys], rtol=1e-5, atol=1e-6)
    sa, sb = (torch.load(run / "training-state-000001.pt", weights_only=True) for run in (one, two))
    assert_same_updates(sa, sb, dict(G=load_network_state(), mu_fake=load_network_state(), head=initial_head_state()))


if __name__ == "__main__":  # Entry point of the DDP test's torchrun workers.
    main(sys.argv[1:])
