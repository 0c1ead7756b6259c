"""DMDGenerator and `dmd generate`: the four sources, per-seed images, EDM's quantisation, eval mode, errors."""

import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from dmd.cli import main
from dmd.edm.persistence import load_network
from dmd.edm.precond import build_network
from dmd.edm.sampler import StackedRandomGenerator, edm_sampler
from dmd.generate import PORT_SIGMA_G, DMDGenerator, GeneratorLoadError
from dmd.generator import one_step
from dmd.utils.common import one_hot, to_uint8

PKL = Path(__file__).parent / "fixtures" / "edm_ddpmpp_cond.pkl"

README_SNIPPET = """
from dmd.generate import DMDGenerator
from dmd.utils.common import display_samples
generator = DMDGenerator(network_path="path/to/model.pt")
samples = generator.generate_batch(seeds=list(range(0, 25)), class_ids=1)
display_samples(samples)
"""


@pytest.fixture(scope="module")
def teacher():
    return load_network(PKL)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(PKL.with_suffix(".npz")))


@pytest.fixture(scope="module")
def generator():
    return DMDGenerator(PKL, device="cpu")


def state_dict(net, scale=1.0):
    return {k: v.clone() * scale if v.is_floating_point() else v.clone() for k, v in net.state_dict().items()}


def write_snapshot(path, net, sigma_G=80.0):
    snapshot = {
        "format": "dmd-snapshot",
        "version": 1,
        "class_name": type(net).__name__,
        "init_kwargs": net.init_kwargs,
        "state_dict": state_dict(net),
        "sigma_G": sigma_G,
        "step": 7,
        "config": {"lr_gen": 2e-6},
    }
    torch.save(snapshot, path)
    return path


def write_training_state(path, net, with_ema):
    # G differs from the EMA weights, so the test sees which of them the generator picked.
    G, G_ema = (state_dict(net, 0.5), state_dict(net)) if with_ema else (state_dict(net), None)
    state = {
        "format": "dmd-training-state",
        "version": 1,
        "class_name": type(net).__name__,
        "init_kwargs": net.init_kwargs,
        "G": G,
        "mu_fake": state_dict(net, 0.25),
        "G_ema": G_ema,
        "opt_G": {"state": {}, "param_groups": []},
        "opt_fake": {"state": {}, "param_groups": []},
        "step": 11,
        "rng": {"torch": torch.get_rng_state()},
        "data_position": {"epoch": 0, "index": 3},
        "config": {},
        "sigma_G": 80.0,
    }
    torch.save(state, path)
    return path


def direct_one_step(net, z, class_idx, sigma=80.0):
    """The generator's images computed straight from the denoiser: D(sigma z; sigma, c), clamped."""
    with torch.no_grad():
        return one_step(net, z, one_hot(class_idx, net.label_dim), sigma=sigma).clamp(-1, 1)


def test_edm_pickle_matches_edm_one_step_output(generator, ref):
    # onestep_out was computed by EDM's own code: net(80 z, 80, labels).
    images = generator.generate_batch(latents=torch.from_numpy(ref["onestep_z"]), class_ids=ref["class_idx"])
    expected = torch.from_numpy(ref["onestep_out"]).clamp(-1, 1)
    assert generator.sigma_G == 80.0 and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def test_seeds_draw_edm_latents_and_labels(generator, ref):
    # EDM's per-seed stream: latent first, then the label; the fixture holds both for seeds 0-3.
    from_seeds = generator.generate_batch(seeds=ref["sampler_seeds"].tolist())
    latents = torch.from_numpy(ref["sampler_latents"])
    from_latents = generator.generate_batch(latents=latents, class_ids=torch.from_numpy(ref["sampler_class_idx"]))
    torch.testing.assert_close(from_seeds, from_latents, atol=1e-6, rtol=0)


def test_teacher_steps_sample_with_edm_sampler(generator, teacher, tmp_path):
    # `--steps N` runs EDM's sampler on the seed's own stream: latent, label, then one noise per step.
    args = ["generate", "--network", str(PKL), "--outdir", str(tmp_path), "--seeds", "0-1", "--steps", "2"]
    result = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rnd = StackedRandomGenerator("cpu", [0, 1])
    latents = rnd.randn([2, 3, 8, 8])
    labels = one_hot(rnd.randint(10, size=[2]), 10)
    with torch.no_grad():
        expected = to_uint8(edm_sampler(teacher, latents, labels, randn_like=rnd.randn_like, num_steps=2))
    for seed in (0, 1):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / f"{seed:06d}.png")), expected[seed])


def test_all_sources_load(teacher, tmp_path):
    z = torch.randn(3, 3, 8, 8)
    class_idx = torch.tensor([0, 4, 9])
    expected = direct_one_step(teacher, z, class_idx)
    sources = {
        "snapshot": write_snapshot(tmp_path / "network-snapshot-000007.pt", teacher),
        "state_ema": write_training_state(tmp_path / "training-state-000011.pt", teacher, with_ema=True),
        "state_no_ema": write_training_state(tmp_path / "training-state-000012.pt", teacher, with_ema=False),
    }
    for name, path in sources.items():
        generator = DMDGenerator(network_path=path, device="cpu")
        images = generator.generate_batch(latents=z, class_ids=class_idx)
        torch.testing.assert_close(images, expected, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_port_checkpoint(teacher, tmp_path, prefix):
    port = {
        "model_g": {prefix + k: v for k, v in state_dict(teacher).items()},
        "optimizer_g": {"state": {}, "param_groups": []},
        "model_d": state_dict(teacher, 0.5),
        "epoch": 3,
    }
    torch.save(port, tmp_path / "port.pt")
    generator = DMDGenerator(tmp_path / "port.pt", device="cpu")
    kwargs = generator.net.init_kwargs
    for key in ("img_resolution", "img_channels", "label_dim", "augment_dim", "model_channels", "channel_mult"):
        assert kwargs[key] == teacher.init_kwargs[key], key
    assert kwargs["num_blocks"] == 1 and kwargs["attn_resolutions"] == [4]
    assert generator.sigma_G == PORT_SIGMA_G
    z, class_idx = torch.randn(2, 3, 8, 8), torch.tensor([3, 5])
    images = generator.generate_batch(latents=z, class_ids=class_idx)
    torch.testing.assert_close(images, direct_one_step(teacher, z, class_idx, PORT_SIGMA_G), atol=1e-6, rtol=0)


def test_port_sigma_is_the_port_grid_index():
    # Index 998 of the port's ascending 1000-level Karras grid from 0.002 to 80.
    i = torch.arange(1000, dtype=torch.float64)
    grid = (0.002 ** (1 / 7) + i / 999 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert PORT_SIGMA_G == pytest.approx(grid[998].item(), abs=1e-12)


def test_same_image_for_a_seed_whatever_the_batch(generator):
    seeds = [5, 17, 1000]
    together = generator.generate_batch(seeds=seeds)
    in_batches = generator.generate_batch(seeds=seeds, batch_size=2)
    reordered = generator.generate_batch(seeds=seeds[::-1])
    assert together.shape == (3, 3, 8, 8) and together.abs().max() <= 1
    torch.testing.assert_close(in_batches, together, atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered.flip(0), together, atol=1e-5, rtol=0)
    assert (together[0] - together[1]).abs().max() > 0.01  # different seeds, different images


def test_class_ids_forms(generator):
    seeds = [0, 1, 2]
    as_int = generator.generate_batch(seeds=seeds, class_ids=7)
    torch.testing.assert_close(generator.generate_batch(seeds=seeds, class_ids=[7, 7, 7]), as_int)
    as_tensor = generator.generate_batch(seeds=seeds, class_ids=torch.tensor([1, 7, 2]))
    torch.testing.assert_close(as_tensor[1], as_int[1])
    assert (as_tensor[0] - as_int[0]).abs().max() > 1e-3  # the label reaches the network


def test_dropout_has_no_effect(teacher):
    net = build_network("EDMPrecond", {**teacher.init_kwargs, "dropout": 0.5})
    net.load_state_dict(teacher.state_dict())
    z, c = torch.randn(2, 3, 8, 8), one_hot([1, 2], 10)
    net.train()
    with torch.no_grad():
        assert (one_step(net, z, c) - one_step(net, z, c)).abs().max() > 1e-3  # dropout is really there

    generator = DMDGenerator(net=net)  # a training net, as the training loop passes G
    first = generator.generate_batch(seeds=[0, 1])
    second = generator.generate_batch(seeds=[0, 1])
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert net.training  # the caller's mode is restored
    assert first.requires_grad is False


def test_readme_snippet_runs(teacher, tmp_path):
    path = write_snapshot(tmp_path / "model.pt", teacher)
    namespace = {}
    exec(README_SNIPPET.replace("path/to/model.pt", str(path)), namespace)
    samples = namespace["samples"]
    assert samples.shape == (25, 3, 8, 8)
    grid = namespace["display_samples"](samples)
    assert isinstance(grid, PIL.Image.Image) and grid.size[0] > 5 * 8


def test_generate_pngs_quantised_like_edm(generator, tmp_path):
    network = str(PKL)
    args = ["generate", "--network", network, "--outdir", str(tmp_path / "out"), "--seeds", "998-1001", "--batch", "3"]
    result = CliRunner().invoke(main, [*args, "--class", "3", "--subdirs", "--grid", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    images = generator.generate_batch(seeds=[998, 999, 1000, 1001], class_ids=3)
    edm = (images.numpy() * 127.5 + 128).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(to_uint8(images), edm)
    for i, seed in enumerate([998, 999, 1000, 1001]):
        folder = "000000" if seed < 1000 else "001000"
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "out" / folder / f"{seed:06d}.png")), edm[i])
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert grid.size[0] > 2 * 8 and grid.size[1] > 2 * 8


def test_grayscale_pngs_are_mode_l(teacher, tmp_path):
    kwargs = {**teacher.init_kwargs, "img_channels": 1, "label_dim": 0}
    net = build_network("EDMPrecond", kwargs)
    write_snapshot(tmp_path / "gray.pt", net)
    args = ["generate", "--network", str(tmp_path / "gray.pt"), "--outdir", str(tmp_path), "--seeds", "4"]
    result = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    image = PIL.Image.open(tmp_path / "000004.png")
    expected = to_uint8(DMDGenerator(tmp_path / "gray.pt", device="cpu").generate_batch(seeds=[4]))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), expected[0, :, :, 0])


def test_load_errors_name_the_file(teacher, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a network")
    with pytest.raises(GeneratorLoadError, match="notes.txt"):
        DMDGenerator(text, device="cpu")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(GeneratorLoadError, match="other.pt.*keys: weights"):
        DMDGenerator(tmp_path / "other.pt", device="cpu")
    broken = state_dict(teacher)
    broken["model.enc.8x8_conv.weight"] = torch.zeros(16, 3, 1, 1)
    torch.save({"model_g": broken}, tmp_path / "port.pt")
    with pytest.raises(GeneratorLoadError, match="port.pt: the weights do not fit"):
        DMDGenerator(tmp_path / "port.pt", device="cpu")
    snapshot = write_snapshot(tmp_path / "no_sigma.pt", teacher)
    data = torch.load(snapshot, weights_only=True)
    del data["sigma_G"]
    torch.save(data, snapshot)
    with pytest.raises(GeneratorLoadError, match="no_sigma.pt: dmd-snapshot without the entry 'sigma_G'"):
        DMDGenerator(snapshot, device="cpu")
    snapshot = write_snapshot(tmp_path / "cut.pt", teacher)
    snapshot.write_bytes(snapshot.read_bytes()[:5000])
    with pytest.raises(GeneratorLoadError, match="cut.pt"):
        DMDGenerator(snapshot, device="cpu")
    with pytest.raises(GeneratorLoadError, match="missing.pt"):
        DMDGenerator(tmp_path / "missing.pt", device="cpu")


def test_generate_batch_errors(generator):
    with pytest.raises(ValueError, match="exactly one of seeds and latents"):
        generator.generate_batch()
    with pytest.raises(ValueError, match="shape"):
        generator.generate_batch(latents=torch.zeros(2, 3, 4, 4), class_ids=0)
    with pytest.raises(ValueError, match="class_ids are needed"):
        generator.generate_batch(latents=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        generator.generate_batch(seeds=[0], class_ids=10)
    with pytest.raises(ValueError, match="3 entries for 2 images"):
        generator.generate_batch(seeds=[0, 1], class_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"seeds must be integers, got 0.5"):  # it used to be seed 0
        generator.generate_batch(seeds=[0.5])
    as_ints = generator.generate_batch(seeds=[3, 4])
    for seeds in (np.array([3, 4]), torch.tensor([3, 4]), [np.int64(3), torch.tensor(4)]):
        assert torch.equal(generator.generate_batch(seeds=seeds), as_ints)


def test_generate_cli_errors(tmp_path):
    args = ["generate", "--network", str(PKL), "--outdir", str(tmp_path)]
    for extra, message in [
        (["--class", "10"], "--class 10 is out of range"),
        (["--class", "1", "--class-balanced"], "exclude each other"),
        (["--seeds", "5-2"], "ends before it starts"),
    ]:
        result = CliRunner().invoke(main, [*args, "--device", "cpu", *extra])
        assert result.exit_code == 1 and message in result.output, result.output
    result = CliRunner().invoke(main, ["generate", "--network", str(tmp_path / "nope.pkl"), "--outdir", str(tmp_path)])
    assert result.exit_code == 1 and "nope.pkl" in result.output


VP_PKL = PKL.with_name("vp_ddpmpp_cond.pkl")
# Noise lists no generator can sample, with the words of check_sigmas' refusal.
BAD_SIGMAS = [
    pytest.param([float("nan")], "finite and positive", id="nan"),
    pytest.param([float("inf")], "finite and positive", id="inf"),
    pytest.param([1e308], "above 10000", id="1e308"),
    pytest.param([float(s) for s in range(1000, 0, -1)], "1000 noise levels", id="1000-levels"),
    pytest.param("80", "a str, not a list", id="string"),
    pytest.param([80.0, "1.5"], "'1.5' is not a number", id="string-entry"),
    pytest.param([1.5, 80.0], "strictly decreasing", id="increasing"),
]


def write_sigmas(path, net, field, value, fmt="snapshot"):
    """A snapshot (or training state) of `net` whose noise levels are `value` under `field`."""
    data = torch.load(write_snapshot(path, net), weights_only=True)
    data.pop("sigma_G")
    data[field] = value
    if fmt == "state":
        data = {**data, "format": "dmd-training-state", "G": data.pop("state_dict"), "G_ema": None}
    torch.save(data, path)
    return path


@pytest.mark.parametrize("sigmas, message", [*BAD_SIGMAS, pytest.param(None, "a NoneType, not a list", id="none")])
@pytest.mark.parametrize("field, fmt", [("generator_sigmas", "snapshot"), ("generator_sigmas", "state")])
def test_a_files_noise_levels_are_checked(teacher, tmp_path, sigmas, message, field, fmt):
    """A stored NaN, inf, 1e308, 1000-long or mistyped list used to give black PNGs with exit 0, hours of work or a
    traceback; each is now one GeneratorLoadError naming the file and the field."""
    path = write_sigmas(tmp_path / "bad.pt", teacher, field, sigmas, fmt)
    with pytest.raises(GeneratorLoadError, match=f"bad.pt: {field}: .*{message}"):
        DMDGenerator(path, device="cpu")


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), 1e308, -1.0, "80", None])
def test_a_one_step_files_sigma_G_is_checked(teacher, tmp_path, sigma):
    path = write_sigmas(tmp_path / "old.pt", teacher, "sigma_G", sigma)
    with pytest.raises(GeneratorLoadError, match="old.pt: sigma_G: "):
        DMDGenerator(path, device="cpu")


@pytest.mark.parametrize("sigmas, message", BAD_SIGMAS)
def test_the_api_checks_sigmas(generator, sigmas, message):
    with pytest.raises(ValueError, match=f"^sigmas: .*{message}"):
        DMDGenerator(net=generator.net, sigmas=sigmas)
    if isinstance(sigmas, list) and len(sigmas) == 1:
        with pytest.raises(ValueError, match=f"^sigma_G: .*{message}"):
            DMDGenerator(net=generator.net, sigma_G=sigmas[0])


def test_noise_levels_stay_inside_the_networks_range(tmp_path):
    """A VP network is trained up to sigma 152: 500 is refused from a file and from the API, 80 is not."""
    vp = load_network(VP_PKL)
    path = write_sigmas(tmp_path / "vp.pt", vp, "generator_sigmas", [500.0, 1.5])
    with pytest.raises(GeneratorLoadError, match=r"vp.pt: generator_sigmas: .*leave the network's range"):
        DMDGenerator(path, device="cpu")
    with pytest.raises(ValueError, match=r"^sigma_G: .*range \[0.000976562, 152.167\]"):
        DMDGenerator(net=vp, sigma_G=500.0)
    assert DMDGenerator(net=vp, sigmas=[80, 1.5]).sigmas == [80.0, 1.5]


def test_the_cli_refuses_a_bad_noise_list_in_one_line(teacher, tmp_path):
    path = write_sigmas(tmp_path / "nan.pt", teacher, "generator_sigmas", [float("nan")])
    result = CliRunner().invoke(main, ["generate", "--network", str(path), "--outdir", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "nan.pt: generator_sigmas" in result.output
    assert not (tmp_path / "out").exists()  # no black PNGs


@pytest.mark.parametrize(
    "change, message",
    [
        ({"img_resolution": 16}, r"96 missing \(model.enc.16x16_conv.weight, .*\), 108 unexpected \(model.enc.8x8"),
        ({"model_channels": 32}, r"size mismatch in \d+ of \d+ tensors, e.g. '[^']+' is \[\d+(, \d+)*\] in the file"),
    ],
)
def test_weights_of_another_network_are_one_short_line(teacher, tmp_path, change, message):
    """A snapshot whose weights do not fit its kwargs (another resolution or width) used to print torch's whole
    size-mismatch text, a 12,634-character line; now one line naming the file, the count and one example."""
    path = write_snapshot(tmp_path / "wrong.pt", teacher)
    data = torch.load(path, weights_only=True)
    data["init_kwargs"] = {**data["init_kwargs"], **change}
    torch.save(data, path)
    result = CliRunner().invoke(main, ["generate", "--network", str(path), "--outdir", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and len(result.output) < 400, result.output
    assert re.search(f"wrong.pt: the weights do not fit the EDMPrecond .*{message}", result.output), result.output


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("class_name", ["EDMPrecond"], r"network class \['EDMPrecond'\] is not one of"),
        ("version", "2", "version is '2', not a number"),
        ("state_dict", [1, 2], "the weights are not a dict of named tensors"),
        ("init_kwargs", {"img_resolution": 8, "num_blocks": 10**9}, "cannot build EDMPrecond: 'num_blocks'"),
    ],
)
def test_fields_of_the_wrong_type_are_one_line(teacher, tmp_path, field, value, message):
    path = write_snapshot(tmp_path / "typed.pt", teacher)
    data = torch.load(path, weights_only=True)
    data[field] = value
    torch.save(data, path)
    with pytest.raises(GeneratorLoadError, match=f"typed.pt: .*{message}"):
        DMDGenerator(path, device="cpu")


def test_repeated_seeds_are_refused(tmp_path):
    """`--seeds 3,3,3` said "3 images" and wrote one; a seed is one image, so a repeated one is a mistake."""
    args = ["generate", "--network", str(PKL), "--outdir", str(tmp_path / "out"), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--seeds", "3,3,3"])
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert result.output == "Error: --seeds gives seed 3 3 times; each seed is one image: list it once\n"
    result = CliRunner().invoke(main, [*args, "--seeds", "0-9,5-12"])
    assert "seed 5 2 times (and 4 other seeds)" in result.output


def test_grid_title_names_the_generators_own_steps(teacher, tmp_path, monkeypatch):
    """A two-step student's grid was titled "one step"; the title now comes from the generator's sigmas."""
    import dmd.generate

    titles = []
    make_grid = dmd.generate.make_grid
    monkeypatch.setattr(dmd.generate, "make_grid", lambda *a, **k: titles.append(k["title"]) or make_grid(*a, **k))
    path = write_sigmas(tmp_path / "two.pt", teacher, "generator_sigmas", [80.0, 1.5])
    for network, extra in ((path, []), (PKL, []), (PKL, ["--steps", "4"])):
        args = ["generate", "--network", str(network), "--outdir", str(tmp_path / "out"), "--seeds", "0-3"]
        result = CliRunner().invoke(main, [*args, "--grid", str(tmp_path / "grid.png"), "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
    assert titles == [
        "two.pt, 2 steps (sigmas 80, 1.5), classes drawn from the seeds",
        "edm_ddpmpp_cond.pkl, one step (sigma 80), classes drawn from the seeds",
        "edm_ddpmpp_cond.pkl, EDM's sampler, 4 steps, classes drawn from the seeds",
    ]


def test_a_run_folder_stands_for_its_newest_snapshot(teacher, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    write_snapshot(run / "network-snapshot-000900.pt", teacher)
    newest = write_snapshot(run / "network-snapshot-001000.pt", build_network("EDMPrecond", teacher.init_kwargs))
    G = DMDGenerator(run, device="cpu")
    assert G.source == str(newest)
    expected = DMDGenerator(newest, device="cpu").generate_batch(seeds=[0, 1])
    assert torch.equal(G.generate_batch(seeds=[0, 1]), expected)

    result = CliRunner().invoke(
        main, ["generate", "--network", str(run), "--outdir", str(tmp_path / "out"), "--seeds", "0"]
    )
    assert result.exit_code == 0, result.output
    assert f"{run}: a run folder; loading its newest snapshot, network-snapshot-001000.pt" in result.output
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "out" / "000000.png")), to_uint8(expected)[0])

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["generate", "--network", str(empty), "--outdir", str(tmp_path / "out2")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"{empty}: a folder without a network snapshot (network-snapshot-NNNNNN.pt" in result.output


def test_repr_says_what_was_loaded(generator, teacher):
    assert repr(generator) == (
        f"DMDGenerator(source='{PKL}', net=EDMPrecond, resolution=8, channels=3, classes=10, sigmas=[80.0], "
        "device='cpu')"
    )
    gray = build_network("EDMPrecond", {**teacher.init_kwargs, "img_channels": 1, "label_dim": 0})
    assert repr(DMDGenerator(net=gray, sigmas=[80, 1.5])) == (
        "DMDGenerator(source=None, net=EDMPrecond, resolution=8, channels=1, classes=unconditional, "
        "sigmas=[80.0, 1.5], device='cpu')"
    )


def test_generate_samples_an_edm2_teacher_guided_as_edm2_does(tmp_path):
    """generate --steps on an EDM2 teacher with --guide-network/--guidance writes EDM2's guided samples (its fixture,
    quantised as PNGs); the guide needs --steps, and a guide that cannot guide is one line before any image."""
    from dmd.utils.common import to_uint8

    edm2 = Path(__file__).parent / "fixtures" / "edm2"
    ref = np.load(edm2 / "edm2_img_cond.npz")
    base = ["generate", "--network", str(edm2 / "edm2_img_cond.pkl"), "--seeds", "0-3", "--no-progress"]
    guide = ["--guide-network", str(edm2 / "edm2_img_guide.pkl"), "--guidance", "1.7"]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, [*base, *guide, "--steps", "8", "--output-dir", str(out), "--grid", str(tmp_path / "g.png")]
    )
    assert result.exit_code == 0, result.output
    pngs = np.stack([np.asarray(PIL.Image.open(out / f"{seed:06d}.png")) for seed in range(4)])
    expected = to_uint8(torch.from_numpy(ref["guided_out"]).clamp(-1, 1))
    assert np.abs(pngs.astype(int) - expected.astype(int)).max() <= 1  # 1e-7 float differences may cross a level
    no_steps = CliRunner().invoke(main, [*base, *guide, "--output-dir", str(tmp_path / "a")])
    assert (
        no_steps.exit_code == 2 and "--guide-network, --guidance set EDM's sampler: give --steps N" in no_steps.output
    )
    wrong = ["--guide-network", str(edm2 / "edm2_latent_cond.pkl"), "--guidance", "2"]
    bad = CliRunner().invoke(main, [*base, *wrong, "--steps", "8", "--output-dir", str(tmp_path / "b")])
    assert bad.exit_code == 1 and bad.output.startswith("Error: --guide-network ") and "8x8x4" in bad.output
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
