"""--fake-score-levels of a few-step generator (dmd/steps.py's fake-score step): 'all' feeds mu_fake and the
discriminator the samples of every step's drawn level as before the option existed, 'last' the final level's only;
bit-exact resume, 2-process DDP against one process, one-step generators unchanged, and the flag's errors.

The step tests build a tiny DMD2 run (the fixture teacher, GAN on, two fake-score updates per G update, levels 80 and
1.5) and record what mu_fake and the discriminator are given, against samples simulated by hand with the public
sampler dmd.generator.sample and the step's own noise streams.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_train import (
    LOSSES,
    ONE_THREAD_ENV,
    ROOT,
    TEACHER,
    assert_same_updates,
    dmd2_args,
    initial_head_state,
    load,
    load_network_state,
    read_stats,
    run_cli,
)

from dmd.batches import draw_generator_inputs, draw_index, draw_noise
from dmd.cli import main
from dmd.config import ConfigError, TrainConfig, resume_changes

SIGMAS = (80.0, 1.5)
B = 4
KEYS = [*LOSSES, "loss_gan", "loss_disc"]


def build(tmp_path, real, levels):
    """The tiny DMD2 run's parts (mu_fake moved off mu_real, so the DM loss is not 0)."""
    from dmd.build import build_parts, build_regression, load_teacher, open_datasets, open_stream

    cfg = TrainConfig(
        model_path=str(TEACHER),
        output_dir=str(tmp_path / "run"),
        real_data=str(real),
        batch_size=B,
        max_steps=1,
        lambda_reg=0.0,
        fake_steps_per_gen=2,
        gan_weight_gen=0.3,
        gan_weight_disc=1.0,
        generator_sigmas=SIGMAS,
        fake_score_levels=levels,
        device="cpu",
        workers=0,
    )
    device = torch.device("cpu")
    mu_real, teacher, _ = load_teacher(cfg, device)
    _, real_data = open_datasets(cfg, mu_real)
    stream = open_stream(real_data, B, "--batch-size", "items", cfg, device)
    parts, _ = build_parts(cfg, mu_real, teacher, build_regression(cfg, device), None, stream, device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in parts.mu_fake.parameters():
            w.add_(1e-2 * torch.randn(w.shape, generator=g))
    return parts


def record_fake_inputs(parts):
    """Wrap the fake-score and discriminator losses to record the images each update gives them: [(x_fake, c)]."""
    seen = dict(fake=[], disc=[])
    fake_loss, discriminator = parts.fake_loss, parts.gan_loss.discriminator

    def fake(net, x, c, **kwargs):
        seen["fake"].append((x.detach().clone(), c))
        return fake_loss(net, x, c, **kwargs)

    def disc(x, c, *args, **kwargs):
        seen["disc"].append(x.detach().clone())
        return discriminator(x, c, *args, **kwargs)

    parts.fake_loss = fake
    parts.gan_loss.discriminator = disc
    return seen


def by_hand(G, step, stream, z, c, level):
    """G's samples at `level` from z (n, C, H, W): the sampler over the first level + 1 sigmas, with the step's
    noise of `stream` between levels."""
    from dmd.generator import sample

    def noise(k):
        return draw_noise(0, step, f"{stream}-noise{k}", tuple(z.shape), slice(None), z.device)

    with torch.no_grad():
        return sample(G, z, c, SIGMAS[: level + 1], noise=noise)


@pytest.mark.parametrize("levels", ["all", "last"])
@pytest.mark.parametrize("step", [1, 3])  # the generator step draws level 0 at step 1, level 1 at step 3
def test_mu_fake_and_the_discriminator_learn_the_levels_asked_for(tmp_path, real, levels, step):
    from dmd.steps import fake_score_step, generator_step

    assert draw_index(0, step, "level", 2) == (0 if step == 1 else 1)
    assert [draw_index(0, s, "fake-level1", 2) for s in (1, 3)] == [0, 1]  # 'all's second update: the same levels
    parts = build(tmp_path, real, levels)
    seen = record_fake_inputs(parts)
    gen = generator_step(parts, step)
    # What each update should see, made by hand with G as updated by the generator step (the fake-score updates
    # do not change G).
    z1, c1 = draw_generator_inputs(parts.mu_real, 0, step, "fake1", B, torch.device("cpu"))
    if levels == "all":  # DMD2: the generator step's samples, then the updated G's at the level drawn for update 1
        expected = [gen.x, by_hand(parts.G, step, "fake1", z1, c1, draw_index(0, step, "fake-level1", 2))]
    else:  # the final level's only: the step's own samples if at the last level, else made from its z
        first = gen.x if gen.level == 1 else by_hand(parts.G, step, "G-last", gen.z, gen.c, 1)
        expected = [first, by_hand(parts.G, step, "fake1", z1, c1, 1)]
    fake_score_step(parts, step, gen)
    assert len(seen["fake"]) == len(seen["disc"]) == 2
    for (x, c), x_disc, x_expected, c_expected in zip(seen["fake"], seen["disc"], expected, [gen.c, c1]):
        assert torch.equal(x, x_expected) and torch.equal(c, c_expected)
        assert torch.equal(x_disc, x_expected)  # the discriminator's fake images are mu_fake's
    if levels == "last" and gen.level == 0:  # the final level's samples are not the step's level-0 samples
        assert (seen["fake"][0][0] - gen.x).abs().mean() > 0.01


# A 2-step DMD2 run (dmd2_args: levels 80 and 1.5, 2 fake-score updates, lr 1e-3) computed with the code before
# --fake-score-levels existed (torch 2.13 CPU, one thread): the statistics KEYS of steps 0 and 1, and the norms of
# G's and mu_fake's weight changes. 'all' matched them bit for bit on that machine; the tolerance leaves room for
# float sums in another order elsewhere, far below the change 'last' makes (loss_fake 0.680 -> 0.722 at step 0).
OLD_STATS = [
    [0.0015131892869248986, 0.0, 0.0, 0.6801713705062866, 0.0004286599869374186, 1.6473753452301025]
    + [0.5043964385986328, 1.566232681274414],
    [0.06631418317556381, 0.06420371681451797, 0.0, 0.7668699622154236, 0.3618847131729126, 1.2137733697891235]
    + [0.7034887075424194, 1.438718557357788],
]
OLD_CHANGE_NORMS = dict(G=0.49705476556671013, mu_fake=1.0947229169010047)


def change_norms(state):
    start = load_network_state()
    return {
        key: torch.cat([(state[key][k] - start[k]).flatten().double() for k in start]).norm().item()
        for key in OLD_CHANGE_NORMS
    }


@pytest.mark.parametrize("levels", ["all", "last"])
def test_all_is_the_run_before_the_option_and_last_is_not(tmp_path, real, levels):
    out = tmp_path / "run"
    run_cli(dmd2_args(out, real, "--max-steps", 2, "--fake-score-levels", levels))
    stats = [[r[k] for k in KEYS] for r in read_stats(out)]
    norms = change_norms(load(out / "training-state-000002.pt"))
    if levels == "all":
        np.testing.assert_allclose(stats, OLD_STATS, rtol=1e-5, atol=1e-7)
        assert norms == pytest.approx(OLD_CHANGE_NORMS, rel=1e-4)
    else:  # the test above can tell: 'last' changes mu_fake's first update already at step 0
        assert abs(stats[0][KEYS.index("loss_fake")] - OLD_STATS[0][KEYS.index("loss_fake")]) > 0.02
        assert norms != pytest.approx(OLD_CHANGE_NORMS, rel=1e-3)


def test_last_resume_is_bit_exact(tmp_path, real):
    straight, split = tmp_path / "straight", tmp_path / "split"
    last = ["--fake-score-levels", "last"]
    run_cli(dmd2_args(straight, real, "--max-steps", 4, *last))
    run_cli(dmd2_args(split, real, "--max-steps", 2, *last))
    run_cli(dmd2_args(split, real, "--max-steps", 4, "--resume", "auto"))  # the run's own setting applies
    assert [[r[k] for k in KEYS] for r in read_stats(split)] == [[r[k] for k in KEYS] for r in read_stats(straight)]
    sa, sb = load(straight / "training-state-000004.pt"), load(split / "training-state-000004.pt")
    for key in ("G", "mu_fake", "head"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key


def test_last_under_two_process_ddp_matches_one_process(tmp_path, real):
    """Step 1 draws level 0, so each rank makes its rows' final-level samples from the step's z by itself."""
    assert draw_index(0, 1, "level", 2) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp += [str(Path(__file__).parent / "test_train.py")]
    flags = ["--lr-gen", "5e-5", "--lr-fake", "5e-5", "--fake-score-levels", "last"]  # the DDP tests' lr
    run_cli(dmd2_args(one, real, "--max-steps", 2) + flags)
    args = dmd2_args(two, real, "--max-steps", 2) + flags + ["--batch-size", "1"]
    proc = subprocess.run(ddp + args, cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_stats(one), read_stats(two)
    np.testing.assert_allclose(
        [[r[k] for k in KEYS] for r in b], [[r[k] for k in KEYS] for r in a], rtol=1e-5, atol=1e-6
    )
    sa, sb = load(one / "training-state-000002.pt"), load(two / "training-state-000002.pt")
    assert_same_updates(sa, sb, dict(G=load_network_state(), mu_fake=load_network_state(), head=initial_head_state()))


def test_a_one_step_generator_ignores_the_option(tmp_path, real):
    stats = []
    for levels in ("all", "last"):
        out = tmp_path / levels
        args = dmd2_args(out, real, "--max-steps", 2, "--fake-score-levels", levels)
        args[args.index("--generator-sigmas") + 1] = "80"  # one level (dmd2_args makes two)
        run_cli(args)
        stats.append([[r[k] for k in KEYS] for r in read_stats(out)])
    assert stats[0] == stats[1]


def test_a_bad_value_names_the_flag_and_old_runs_resume_as_all(tmp_path):
    with pytest.raises(ConfigError, match="--fake-score-levels must be 'all' or 'last'"):
        TrainConfig(model_path="t.pkl", output_dir="run", max_steps=1, lambda_reg=0, fake_score_levels="first")
    args = ["train", "--network", str(TEACHER), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    result = CliRunner().invoke(main, [*args, "--lambda-reg", "0", "--fake-score-levels", "first"])
    assert result.exit_code == 2 and "Invalid value for '--fake-score-levels'" in result.output
    assert not (tmp_path / "run").exists()
    # A training state written before the option existed holds no value: it resumes as 'all', what it ran.
    new = TrainConfig(model_path="t.pkl", output_dir="run", max_steps=1, lambda_reg=0)
    old = {k: v for k, v in new.to_dict().items() if k != "fake_score_levels"}
    assert resume_changes(old, new) == {}
    with pytest.raises(ConfigError, match="--fake-score-levels all -> last"):
        resume_changes(old, TrainConfig(**{**new.to_dict(), "fake_score_levels": "last"}))
