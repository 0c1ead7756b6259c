"""f-distill (dmd/fdistill.py) and --gan-features: the weights h(r) against hand values, the ratio's clamp and clip,
the per-bin normalisation and its EMA on hand-made batches, the generator step (rkl is DMD2's step to the bit; the
ratio is read at the DM loss's own x_t; the network passes each option costs), teacher features' gradients, and the
command line end to end: EDM and EDM2 teachers, two processes against one, bit-exact resume, the errors."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import ONE_THREAD_ENV, ROOT, load, read_stats, run_cli, train_args

from dmd.config import DIVERGENCES, RECIPES, ConfigError, TrainConfig
from dmd.fdistill import WEIGHTINGS, FDistillWeights, bin_of, density_ratio

TEACHER = Path(__file__).parent / "fixtures" / "edm_ddpmpp_cond.pkl"  # EDMPrecond + SongUNet, 8x8, label_dim 10
EDM2 = Path(__file__).parent / "fixtures" / "edm2"
KEYS = ("loss_G", "loss_dm", "loss_gan", "loss_fake", "loss_disc", "grad_norm_G", "grad_norm_fake")
WEIGHT_KEYS = ("h_min", "h_mean", "h_max")


# ----------------------------------------------------------------------------------------------------------------------
# The weights.


def test_each_divergence_weights_as_its_formula_says():
    r = torch.tensor([0.5, 1.0, 4.0])
    expected = {
        "rkl": [1, 1, 1],
        "kl": [0.5, 1, 4],
        "js": [1 / 3, 1 / 2, 4 / 5],  # 1 - 1/(1+r)
        "hellinger": [math.sqrt(0.5), 1, 2],
        "jeffreys": [1.5, 2, 5],
        "neyman": [2, 1, 0.25],
        "sf": [2 / 3, 1 / 2, 1 / 5],  # 1/(1+r)
    }
    assert set(WEIGHTINGS) == set(DIVERGENCES) == set(expected)  # the CLI's names are the weightings'
    for name, values in expected.items():
        torch.testing.assert_close(
            WEIGHTINGS[name](r), torch.tensor(values, dtype=torch.float32), rtol=1e-6, atol=0, msg=name
        )


def test_ratio_is_exp_of_the_clamped_logit_clipped_and_detached():
    logits = torch.tensor([-1e30, -3.0, math.log(0.5), 0.0, 1.0, math.log(19.0), 3.0, 1e30], requires_grad=True)
    r = density_ratio(logits)
    torch.testing.assert_close(r, torch.tensor([0.1, 0.1, 0.5, 1.0, math.e, 19.0, 20.0, 20.0]))  # e^-3 < 0.1, e^3 > 20
    assert not r.requires_grad and torch.isfinite(density_ratio(torch.tensor([1e38 * 10]))).all()  # inf logit: 20


def test_bins_cut_the_index_range_in_ten_equal_parts():
    torch.testing.assert_close(
        bin_of(torch.tensor([20, 29, 30, 69, 70, 119]), 20, 120), torch.tensor([0, 0, 1, 4, 5, 9])
    )
    # 15 indices: bins 1.5 wide, 10 i // 15.
    torch.testing.assert_close(bin_of(torch.tensor([0, 1, 2, 3, 13, 14]), 0, 15), torch.tensor([0, 0, 1, 2, 8, 9]))


# A batch over the index range [20, 120): bins 0, 0, 1, 9, 3 with ratios 1, 3, 2, 4, 0.5.
INDEX = torch.tensor([20, 29, 30, 119, 55])
LOGITS = torch.tensor([1.0, 3.0, 2.0, 4.0, 0.5]).log()


def test_each_ratio_is_divided_by_its_bins_mean_and_the_weights_by_theirs():
    weights = FDistillWeights("kl", (20, 120))
    w, stats = weights(LOGITS, INDEX)
    # Bin means 2 (bin 0), 2, 4, 0.5: relative ratios 1/2, 3/2, 1, 1, 1; h = r (kl), mean 1.
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5, 1.0, 1.0, 1.0]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.stack(list(stats.values())), torch.tensor([0.5, 1.0, 1.5]), rtol=1e-5, atol=0)
    bins = torch.ones(10)  # the bins without samples keep their start, 1
    bins[[0, 1, 3, 9]] = torch.tensor([2.0, 2.0, 0.5, 4.0])
    torch.testing.assert_close(weights.bins, bins)
    # JS on the same batch: h = 1 - 1/(1 + r) of the relative ratios, then over their mean.
    h = torch.tensor([1 / 3, 3 / 5, 1 / 2, 1 / 2, 1 / 2])
    torch.testing.assert_close(FDistillWeights("js", (20, 120))(LOGITS, INDEX)[0], h / h.mean(), rtol=1e-5, atol=0)


def test_ratio_ema_blends_the_bins_that_have_samples():
    weights = FDistillWeights("kl", (20, 120), ema=0.5)
    w, _ = weights(LOGITS, INDEX)
    # bins = 0.5 * 1 + 0.5 * mean: 1.5, 1.5, 0.75 (bin 3), 2.5 (bin 9).
    relative = torch.tensor([1 / 1.5, 3 / 1.5, 2 / 1.5, 4 / 2.5, 0.5 / 0.75])
    torch.testing.assert_close(w, relative / relative.mean(), rtol=1e-5, atol=0)
    # A second batch with one sample, in bin 0 (ratio 2): bin 0 becomes 0.5 * 1.5 + 0.5 * 2; the others stay.
    w, stats = weights(torch.tensor([2.0]).log(), torch.tensor([25]))
    bins = torch.ones(10)
    bins[[0, 1, 3, 9]] = torch.tensor([1.75, 1.5, 0.75, 2.5])
    torch.testing.assert_close(weights.bins, bins)
    torch.testing.assert_close(stats["h_mean"], torch.tensor(2 / 1.75), rtol=1e-5, atol=0)
    restored = FDistillWeights("kl", (20, 120), ema=0.5)
    restored.load_state_dict(weights.state_dict())
    assert torch.equal(restored.bins, weights.bins)
    with pytest.raises(ValueError, match="10 values"):
        restored.load_state_dict({"bins": torch.ones(3)})
    with pytest.raises(ValueError, match="unknown divergence 'tv'"):
        FDistillWeights("tv", (20, 120))


# ----------------------------------------------------------------------------------------------------------------------
# The generator step on the fixture teacher.


def build(tmp_path, real, **options):
    """The parts of a one-process DMD2 run of 4 images on the fixture teacher, mu_fake moved off the teacher."""
    from dmd.build import build_parts, load_teacher, open_datasets, open_stream

    cfg = TrainConfig(
        **dict(
            model_path=str(TEACHER),
            output_dir=str(tmp_path / "run"),
            real_data=str(real),
            batch_size=4,
            max_steps=1,
            lambda_reg=0.0,
            gan_weight_gen=0.3,  # DMD2's 3e-3 times 100: the GAN's term well above float noise
            gan_weight_disc=1.0,
            device="cpu",
            workers=0,
        ),
        **options,
    )
    device = torch.device("cpu")
    mu_real, teacher, _ = load_teacher(cfg, device)
    real_stream = open_stream(open_datasets(cfg, mu_real)[1], 4, "--batch-size", "images", cfg, device)
    parts, _ = build_parts(cfg, mu_real, teacher, None, None, real_stream, device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a copy of mu_real would make the DM loss exactly 0
        for w in parts.mu_fake.parameters():
            w.add_(1e-2 * torch.randn(w.shape, generator=g))
    return parts, teacher


def count_calls(monkeypatch, net, method):
    calls = []
    original = getattr(net, method)
    monkeypatch.setattr(net, method, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def reference_losses(parts, step, weigh=None):
    """The DM and GAN terms of step `step` made by hand from the losses (DMD2's generator step), before G steps:
    (DM (N,), GAN (N,), the DM loss's aux); `weigh(x, c, aux)` replaces the GAN term by the GAN read at aux's x_t."""
    from dmd.batches import draw_generator_inputs, step_generator
    from dmd.steps import generated

    cfg, n = parts.cfg, parts.n
    z, c = draw_generator_inputs(parts.mu_real, cfg.seed, step, "G", n, parts.device)
    with torch.no_grad():
        x = parts.G(*generated(parts.G, z, c, cfg, step, "G", 0, slice(0, n), n), c)
        dm, aux = parts.dm_loss(x, c, generator=step_generator(cfg.seed, step, "dm"))
        if weigh is not None:
            return dm, weigh(x, c, aux), aux
        gan, _ = parts.gan_loss.generator(x, c, generator=step_generator(cfg.seed, step, "gan"), rows=slice(0, n), n=n)
    return dm, gan, aux


def test_rkl_step_is_dmd2s_step_to_the_bit_with_no_extra_pass(tmp_path, real, monkeypatch):
    from dmd.steps import generator_step

    parts, _ = build(tmp_path, real)
    assert parts.fdistill is None and parts.gan_loss.features is parts.mu_fake and parts.gan_loss.train_features
    dm, gan, _ = reference_losses(parts, 0)
    passes = count_calls(monkeypatch, parts.mu_fake, "bottleneck")
    heads = count_calls(monkeypatch, parts.head, "forward")
    rng = torch.get_rng_state()
    gen = generator_step(parts, 0)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw of the global RNG: every draw is the step's
    assert torch.equal(gen.losses["loss_dm"], dm.mean()) and torch.equal(gen.losses["loss_gan"], gan.mean())
    assert torch.equal(gen.losses["loss_G"], dm.mean() + 0.3 * gan.mean())
    assert (len(passes), len(heads)) == (1, 1)  # the GAN term's, nothing more
    assert all(float(v) == 1.0 for v in gen.weights.values())


def test_fdistill_weighs_each_dm_term_by_the_ratio_at_its_own_x_t(tmp_path, real, monkeypatch):
    from dmd.steps import generator_step

    parts, _ = build(tmp_path, real, divergence="js", fdistill_ratio_ema=0.5)
    hand = FDistillWeights("js", parts.dm_loss.grid.index_range(0.02, 0.98), ema=0.5)
    dm, logits, aux = reference_losses(parts, 0, lambda x, c, aux: parts.gan_loss.at(aux["x_t"], aux["sigma"], c))
    w, stats = hand(logits, aux["t"])
    assert w.std() > 1e-3  # weights that differ, so that the check below can tell
    passes = count_calls(monkeypatch, parts.mu_fake, "bottleneck")
    gen = generator_step(parts, 0)
    torch.testing.assert_close(gen.losses["loss_dm"], (w * dm).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.stack(list(gen.weights.values())), torch.stack(list(stats.values())))
    assert torch.equal(parts.fdistill.bins, hand.bins)
    assert len(passes) == 2  # --gan-features fake: the GAN term's pass and one more, without gradient, at x_t


def test_teacher_features_read_the_dm_loss_x_t_once_and_train_only_the_head(tmp_path, real, monkeypatch):
    from dmd.steps import fake_score_step, generator_step

    parts, teacher = build(tmp_path, real, divergence="js", gan_features="teacher")
    assert parts.gan_loss.features is teacher and not parts.gan_loss.train_features
    at_x_t = lambda x, c, aux: parts.gan_loss.at(aux["x_t"], aux["sigma"], c)  # noqa: E731
    dm, logits, aux = reference_losses(parts, 0, at_x_t)
    w, _ = FDistillWeights("js", parts.dm_loss.grid.index_range(0.02, 0.98))(logits, aux["t"])
    fake_passes = count_calls(monkeypatch, parts.mu_fake, "bottleneck")
    teacher_passes = {
        m: count_calls(monkeypatch, teacher, m) for m in ("forward", "bottleneck", "forward_with_bottleneck")
    }
    # G's step: the GAN term on the DM loss's x_t (same sigma and noise), its logits the ratio's, and the DM target:
    # one teacher pass, shared.
    gen = generator_step(parts, 0)
    torch.testing.assert_close(gen.losses["loss_gan"], F.softplus(-logits).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(gen.losses["loss_dm"], (w * dm).mean(), rtol=1e-6, atol=0)
    assert len(fake_passes) == 0 and {m: len(v) for m, v in teacher_passes.items()} == {
        "forward": 0,
        "bottleneck": 0,
        "forward_with_bottleneck": 1,
    }
    assert gen.norm > 0
    assert all(p.grad is None for p in [*teacher.parameters(), *parts.head.parameters()])
    # G's GAN term alone: its gradient reaches G's samples through the frozen teacher, and nothing else.
    x = gen.x.clone().requires_grad_(True)
    h = teacher.bottleneck(x - x.detach() + aux["x_t"], aux["sigma"], gen.c)
    parts.gan_loss.generator(x, gen.c, features=h, sigma=aux["sigma"])[0].sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*teacher.parameters(), *parts.head.parameters()])
    # The discriminator step: the head learns; the teacher has no gradient (nor mu_fake from the GAN).
    x_fake, (x_real, k) = gen.x, parts.real_stream.next(parts.device)
    c_real = torch.nn.functional.one_hot(k, 10).float()
    parts.gan_loss.discriminator(x_fake, gen.c, x_real, c_real)[0].mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts.head.parameters())
    assert all(p.grad is None for p in [*teacher.parameters(), *parts.mu_fake.parameters()])
    fake_score_step(parts, 0, gen)  # the whole step runs
    # DMD2's features: the same discriminator loss trains mu_fake's encoder too.
    parts_fake, _ = build(tmp_path, real)
    parts_fake.gan_loss.discriminator(x_fake, gen.c, x_real, c_real)[0].mean().backward()
    assert any(p.grad is not None for p in parts_fake.mu_fake.parameters())


def test_teacher_features_from_the_dm_loss_keep_their_gradient_in_bf16(tmp_path, real):
    # The DM loss's teacher pass casts the bf16 bottleneck to float32: with the gradient to G's samples kept.
    parts, teacher = build(tmp_path, real, gan_features="teacher", precision="bf16")
    assert teacher.compute_dtype == torch.bfloat16 and parts.dm_loss.bottleneck
    x = torch.randn(4, 3, 8, 8).requires_grad_(True)
    c = torch.eye(10)[:4]
    _, aux = parts.dm_loss(x, c, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(aux["h_real"], teacher.bottleneck(aux["x_t"], aux["sigma"], c), rtol=0, atol=0)
    parts.gan_loss.generator(x, c, features=aux["h_real"], sigma=aux["sigma"])[0].sum().backward()
    assert x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------------
# tests/test_gan.py's biased teacher (mode weights 0.2, 0.3, 0.5 where the data have 0.5, 0.3, 0.2), distilled with
# the GAN on real samples: DMD2, and f-distill JS weighting its DM term by the same discriminator's ratio.


def test_js_moves_the_modes_toward_the_data_at_least_as_far_as_dmd2():
    # Mode 0's mean fraction over three seeds: DMD2 0.43, f-distill JS 0.61 (it overshoots the data's 0.5: mode 2
    # falls to 0.13 of 0.2), on one CPU. Checked with a margin: JS's mode 0 at least 0.05 above DMD2's.
    from test_gan import _distil_mixture, biased_teacher

    dmd2 = torch.stack([_distil_mixture(seed, biased_teacher(), 3.0) for seed in range(3)]).mean(0)
    js = torch.stack([_distil_mixture(seed, biased_teacher(), 3.0, divergence="js") for seed in range(3)]).mean(0)
    print(f"mode fractions: DMD2 {dmd2.tolist()}, f-distill JS {js.tolist()}")
    assert js[0] > dmd2[0] + 0.05


# ----------------------------------------------------------------------------------------------------------------------
# The command line.


def fdistill_args(out, real, *extra):
    """A small f-distill run on the fixture teacher: --recipe fdistill, two fake-score steps, lr 5e-5."""
    args = train_args(out, None, "--recipe", "fdistill", "--real-data", real, "--fake-steps-per-gen", 2, *extra)
    i = args.index("--lambda-reg")
    del args[i : i + 2]  # the recipe sets it
    return args + ["--lr-gen", "5e-5", "--lr-fake", "5e-5"]


@pytest.mark.parametrize("features", ["fake", "teacher"])
def test_two_processes_equal_one(tmp_path, real, features):
    # One row per process (as the DMD2 DDP test: the ranks' real images pair with G's rows as one process's do), so
    # most steps hold one sample per bin: the ratio EMA makes the weights differ anyway.
    from test_train import assert_same_updates, initial_head_state, load_network_state

    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--max-steps", 2, "--gan-features", features, "--fdistill-ratio-ema", 0.5]
    run_cli(fdistill_args(one, real, "--batch-size", 2, *extra))
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = ddp + [str(Path(__file__).parent / "test_train.py")] + fdistill_args(two, real, "--batch-size", 1, *extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_stats(one), read_stats(two)
    assert all(r["h_max"] > r["h_min"] + 1e-3 for r in a)
    keys = [*KEYS, *WEIGHT_KEYS]
    np.testing.assert_allclose(
        [[r[k] for k in keys] for r in b], [[r[k] for k in keys] for r in a], rtol=1e-5, atol=1e-6
    )
    sa, sb = load(one / "training-state-000002.pt"), load(two / "training-state-000002.pt")
    torch.testing.assert_close(sb["fdistill"]["bins"], sa["fdistill"]["bins"], rtol=1e-5, atol=0)
    assert_same_updates(sa, sb, dict(G=load_network_state(), mu_fake=load_network_state(), head=initial_head_state()))


def straight_and_resumed(tmp_path, real, *args):
    """Run 4 steps straight and 2 + 2 with a resume; assert equal statistics (losses and weights) at every logged step
    and return both runs' final training states."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(fdistill_args(straight, real, "--max-steps", 4, *args))
    run_cli(fdistill_args(split, real, "--max-steps", 2, *args))
    run_cli(fdistill_args(split, real, "--max-steps", 4, "--resume", "auto", *args))
    keys = [*KEYS, *WEIGHT_KEYS]
    assert [[r[k] for k in keys] for r in read_stats(split)] == [[r[k] for k in keys] for r in read_stats(straight)]
    return load(straight / "training-state-000004.pt"), load(split / "training-state-000004.pt")


def test_resume_with_the_ratio_ema_is_bit_exact(tmp_path, real):
    sa, sb = straight_and_resumed(tmp_path, real, "--batch-size", 3, "--fdistill-ratio-ema", 0.5)
    assert not torch.equal(sa["fdistill"]["bins"], torch.ones(10))  # the state the resume must restore
    assert torch.equal(sa["fdistill"]["bins"], sb["fdistill"]["bins"])
    for key in ("G", "mu_fake", "head"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key


def test_fastgen_style_run_with_every_new_option_resumes_bit_exact_and_samples_each_ema(tmp_path, real):
    # f-distill with teacher features, three constant-decay EMAs and a two-step G whose fake score sees its last
    # level only: interrupted and resumed, the run equals the straight one in its statistics, every network and every
    # EMA, and each EMA's snapshot samples through `generate` as that EMA of the training state does.
    from dmd.generate import DMDGenerator

    args = ["--batch-size", 3, "--gan-features", "teacher", "--ema", "0.9999,0.99995,0.9996"]
    args += ["--generator-sigmas", "80,1.5", "--fake-score-levels", "last", "--fdistill-ratio-ema", 0.5]
    sa, sb = straight_and_resumed(tmp_path, real, *args)
    assert list(sa["emas"]) == ["0.9999", "0.99995", "0.9996"]
    pairs = [(sa[k], sb[k]) for k in ("G", "mu_fake", "head")] + [(sa["emas"][k], sb["emas"][k]) for k in sa["emas"]]
    assert all(torch.equal(a[k], b[k]) for a, b in pairs for k in a)
    state = tmp_path / "straight" / "training-state-000004.pt"
    for name in sa["emas"]:
        snapshot = tmp_path / "straight" / f"network-snapshot-000004-ema{name}.pt"
        from_snapshot = DMDGenerator(snapshot).generate_batch(seeds=[0, 1], class_ids=[3, 4])
        from_state = DMDGenerator(state, ema=name).generate_batch(seeds=[0, 1], class_ids=[3, 4])
        assert torch.equal(from_snapshot, from_state), name
    assert not torch.equal(sa["emas"]["0.9996"]["model.enc.8x8_conv.weight"], sa["G"]["model.enc.8x8_conv.weight"])


def test_fdistill_recipe_on_a_guided_edm2_teacher_with_teacher_features(tmp_path, real):
    import json

    out = tmp_path / "run"
    args = ["train", "--network", str(EDM2 / "edm2_img_cond.pkl"), "--guide-network", str(EDM2 / "edm2_img_guide.pkl")]
    args += ["--guidance", "1.7", "--output-dir", str(out), "--device", "cpu", "--workers", "0", "--log-every", "1"]
    args += ["--image-every", "0", "--checkpoint-every", "0", "--batch-size", "2", "--recipe", "fdistill"]
    args += ["--real-data", str(real), "--fake-steps-per-gen", "1", "--gan-features", "teacher", "--max-steps", "2"]
    result = run_cli(args)
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("recipe", "divergence", "gan_features")} == dict(
        recipe="fdistill", divergence="js", gan_features="teacher"
    )
    recipe = {k: v for k, v in RECIPES["dmd2"].items() if k != "fake_steps_per_gen"}  # set here to 1
    assert {k: config[k] for k in recipe} == recipe
    # Weights averaging 1 (divided by their mean + 1e-6): the extremes on either side of 1.
    assert all(r["loss_gan"] > 0 and r["h_max"] > 1 - 1e-5 and 0 < r["h_min"] < 1 + 1e-5 for r in read_stats(out))
    assert "| h " in result.output  # the console shows f-distill's weights


def test_dmd2_console_hides_the_weights(tmp_path, real):
    out = tmp_path / "run"
    args = fdistill_args(out, real, "--max-steps", 1, "--batch-size", 2, "--divergence", "rkl")
    result = run_cli(args)
    assert "| h " not in result.output and read_stats(out)[0]["h_mean"] == 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        (["--recipe", "dmd", "--divergence", "js"], "--divergence js takes the density ratio from the GAN head"),
        (["--divergence", "tv"], "Invalid value for '--divergence'"),
        (["--batch-gpu", "1"], "--divergence js with --batch-gpu below --batch-size"),
        (["--fdistill-ratio-ema", "1"], "Invalid value for '--fdistill-ratio-ema'"),
        (["--recipe", "dmd", "--gan-features", "teacher"], "--gan-features teacher needs the GAN on"),
    ],
)
def test_bad_settings_name_the_flag(tmp_path, real, change, message):
    args = fdistill_args(tmp_path / "run", real, "--max-steps", 1, "--batch-size", 2) + change
    if "dmd" in change:  # without the GAN: no real data, no regression pairs
        i = args.index("--real-data")
        args[i : i + 2] = ["--lambda-reg", "0"]
    result = run_cli(args, expect_ok=False)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    with pytest.raises(ConfigError, match="--fdistill-ratio-ema must be in"):
        TrainConfig(model_path="t.pkl", output_dir="o", max_steps=1, lambda_reg=0, fdistill_ratio_ema=-0.1)
