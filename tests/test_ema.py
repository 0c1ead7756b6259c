"""Several EMAs of G (--ema): parsing, the update against hand values, one file per EMA per checkpoint that
`generate`, `fid calc` and DMDGenerator load, FID per EMA, bit-exact resume, and old runs' --ema-halflife-kimg.

The runs are 2-3 steps of the tiny fixture teacher without regression (no LPIPS), as in tests/test_train.py.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from test_train import PixelFeatures, load, read_stats, run_cli, train_args

from dmd.checkpoint import prune_checkpoints
from dmd.config import ConfigError, TrainConfig, ema_beta, parse_ema, resume_changes
from dmd.generate import DMDGenerator, GeneratorLoadError
from dmd.utils.training import update_ema

FASTGEN = ("0.9999", "0.99995", "0.9996")  # NVIDIA FastGen's three EMAs, decays per step
BASE = dict(model_path="teacher.pkl", output_dir="run", max_steps=10, lambda_reg=0)


def equal_weights(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def lerped(ema, G, beta):
    """One EMA update by hand on state dicts: ema + (1 - beta) (G - ema), as torch.lerp computes it."""
    return {k: torch.lerp(ema[k], G[k], 1 - beta) if ema[k].is_floating_point() else G[k] for k in ema}


@pytest.mark.parametrize(
    "given, names",
    [
        ("10kimg", ("10kimg",)),
        ("0.9999,0.99995,0.9996", FASTGEN),
        (" 10.0KIMG , 0.99990 ", ("10kimg", "0.9999")),
        ("0.5kimg,0.999", ("0.5kimg", "0.999")),
        ("", ()),
        ([0.9999, "2kimg"], ("0.9999", "2kimg")),
    ],
)
def test_both_syntaxes_parse_to_one_normal_form(given, names):
    assert parse_ema(given) == names
    assert TrainConfig(**BASE, ema=given).ema == names


@pytest.mark.parametrize(
    "given, fragment",
    [
        ("1", "decay per step in (0, 1)"),
        ("0", "decay per step in (0, 1)"),
        ("-0.5", "decay per step in (0, 1)"),
        ("0kimg", "positive number of kimg"),
        ("infkimg", "positive number of kimg"),
        ("nan", "decay per step"),
        ("10 kimgs", "half-life such as 10kimg"),
        ("0.9999,0.99990", "0.9999 more than once"),
        ("10kimg,10.0kimg", "10kimg more than once"),
    ],
)
def test_bad_or_repeated_entries_name_the_flag(given, fragment):
    with pytest.raises(ConfigError, match="--ema") as e:
        TrainConfig(**BASE, ema=given)
    assert fragment in str(e.value)


def test_beta_per_step_of_a_half_life_and_of_a_constant():
    assert ema_beta("10kimg", 100) == 0.5 ** (100 / 10000)  # EDM's: half the weight after 10,000 images
    assert ema_beta("0.01kimg", 2) == 0.5**0.2
    assert ema_beta("0.9996", 4096) == 0.9996  # FastGen's: whatever the batch


def test_update_is_the_weighted_mean_by_hand():
    G, G_ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        G.weight.copy_(torch.tensor([[1.0, 2.0]]))
        G_ema.weight.copy_(torch.tensor([[0.0, 4.0]]))
    update_ema(G_ema, G, 0.75)
    assert torch.allclose(G_ema.weight, torch.tensor([[0.25, 3.5]]))  # 0.75 (0, 4) + 0.25 (1, 2)


def test_an_old_config_with_a_half_life_reads_as_ema():
    old = {**TrainConfig(**BASE).to_dict(), "ema_halflife_kimg": 10.0}
    del old["ema"]
    assert TrainConfig.from_dict(old).ema == ("10kimg",)
    assert TrainConfig.from_dict({**old, "ema_halflife_kimg": 0.0}).ema == ()
    assert resume_changes(old, TrainConfig(**BASE, ema="10kimg")) == {}  # the same run
    with pytest.raises(ConfigError, match="--ema cannot change within a run"):
        resume_changes(old, TrainConfig(**BASE, ema="10kimg,0.9999"))


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    """The tiny FID detector of tests/test_train.py (16 pixel values) and a reference for it."""
    from dmd.fid import save_ref

    folder = tmp_path_factory.mktemp("fid")
    torch.jit.script(PixelFeatures()).save(str(folder / "detector.pt"))
    save_ref(np.random.default_rng(0).uniform(0.3, 0.7, 16), np.eye(16) * 0.05, folder / "ref.npz")
    return folder / "detector.pt", folder / "ref.npz"


def fastgen_args(out, fid_files, steps, *extra):
    detector, ref = fid_files
    fid = ["--fid-every", 1, "--fid-num", 8, "--fid-ref", ref, "--fid-detector", detector]
    args = ["--max-steps", steps, "--batch-size", 2, "--lr-gen", 1e-2, "--ema", ",".join(FASTGEN), *fid, *extra]
    return train_args(out, None, *args)


@pytest.fixture(scope="module")
def fastgen_run(tmp_path_factory, fid_files):
    """Two steps with FastGen's three EMAs, scored and checkpointed at every step, every checkpoint kept."""
    out = tmp_path_factory.mktemp("fastgen") / "run"
    result = run_cli(fastgen_args(out, fid_files, 2, "--checkpoint-every", 1, "--keep-last", 0))
    return out, result.output


def test_three_emas_give_three_snapshots_per_checkpoint_and_a_state_holding_all(fastgen_run):
    out, _ = fastgen_run
    for step in (1, 2):
        names = sorted(p.name for p in out.glob(f"network-snapshot-{step:06d}*"))
        assert names == sorted(f"network-snapshot-{step:06d}-ema{name}.pt" for name in FASTGEN)
    one, two = load(out / "training-state-000001.pt"), load(out / "training-state-000002.pt")
    assert list(two["emas"]) == list(FASTGEN) and equal_weights(two["G_ema"], two["emas"]["0.9999"])
    for name in FASTGEN:  # each EMA: its step-1 value moved towards G of step 2 by (1 - beta)
        assert equal_weights(two["emas"][name], lerped(one["emas"][name], two["G"], float(name)))
        snapshot = load(out / f"network-snapshot-000002-ema{name}.pt")
        assert snapshot["ema"] == name and equal_weights(snapshot["state_dict"], two["emas"][name])
    assert not equal_weights(two["emas"]["0.9999"], two["emas"]["0.9996"])


def test_prune_keeps_the_newest_of_each_ema(fastgen_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(fastgen_run[0], out)
    prune_checkpoints(out, 1)
    snapshots = sorted(p.name for p in out.glob("network-snapshot-0*"))
    assert snapshots == sorted(f"network-snapshot-000002-ema{name}.pt" for name in FASTGEN)
    assert [p.name for p in out.glob("training-state-*")] == ["training-state-000002.pt"]
    assert len(list(out.glob("network-snapshot-best-*"))) == 3  # never pruned


def test_fid_every_scores_each_ema_and_keeps_a_best_snapshot_of_each(fastgen_run):
    out, output = fastgen_run
    records = [r for r in read_stats(out) if "fid_0.9999" in r]
    assert [r["step"] for r in records] == [1, 2] and not any("fid" in r for r in records)
    state = load(out / "training-state-000002.pt")
    for name in FASTGEN:
        fids = [(r["step"], r[f"fid_{name}"]) for r in records]
        best_step, best = min(fids, key=lambda f: f[1])
        assert state["best_fids"][name] == best
        assert load(out / f"network-snapshot-best-ema{name}.pt")["step"] == best_step
    assert state["best_fid"] == state["best_fids"]["0.9999"]
    line = next(line for line in output.splitlines() if "step 2/2" in line and "FID" in line)
    assert all(f"{name} {records[1]['fid_' + name]:.3f}" in line for name in FASTGEN)


def test_plot_draws_one_fid_curve_per_ema(fastgen_run):
    pytest.importorskip("matplotlib")
    from dmd.plot import figure

    out, _ = fastgen_run
    records = [r for r in read_stats(out) if "fid_0.9999" in r]
    lines = {line.get_label(): list(line.get_ydata()) for line in figure(out).axes[-1].get_lines()}
    for name in FASTGEN:
        assert lines[f"FID {name}"] == [r[f"fid_{name}"] for r in records]


def test_generate_and_fid_calc_load_each_snapshot_and_the_state_by_name(fastgen_run, fid_files, tmp_path):
    out, _ = fastgen_run
    state = out / "training-state-000002.pt"
    detector, ref = fid_files
    fid = ["fid", "calc", "--ref", ref, "--detector", detector, "--num", 8, "--batch", 8, "--device", "cpu"]
    for name in FASTGEN:
        snapshot = out / f"network-snapshot-000002-ema{name}.pt"
        pngs = []
        for i, source in enumerate([["--network", snapshot], ["--network", state, "--ema", name]]):
            folder = tmp_path / f"{name}-{i}"
            run_cli(["generate", *source, "--output-dir", folder, "--seeds", "0-3", "--device", "cpu"])
            pngs.append([p.read_bytes() for p in sorted(folder.glob("*.png"))])
        assert len(pngs[0]) == 4 and pngs[0] == pngs[1]
        scores = [
            run_cli([*fid, *source]).output for source in (["--network", snapshot], ["--network", state, "--ema", name])
        ]
        assert scores[0] == scores[1] and scores[0].startswith("FID: ")


def test_dmd_generator_selects_an_ema_or_g_and_names_the_choices(fastgen_run):
    out, _ = fastgen_run
    state_path = out / "training-state-000002.pt"
    state = load(state_path)
    weights = {name: DMDGenerator(state_path, device="cpu", ema=name).net.state_dict() for name in FASTGEN}
    assert all(equal_weights(weights[name], state["emas"][name]) for name in FASTGEN)
    assert equal_weights(DMDGenerator(state_path, device="cpu").net.state_dict(), state["emas"]["0.9999"])
    assert equal_weights(DMDGenerator(state_path, device="cpu", ema="none").net.state_dict(), state["G"])
    with pytest.raises(
        GeneratorLoadError, match=r"no EMA '0.5' \(--ema\); choose one of 0.9999, 0.99995, 0.9996, none"
    ):
        DMDGenerator(state_path, device="cpu", ema="0.5")
    # A run folder: the newest snapshot of the first EMA, or of the one named.
    assert DMDGenerator(out, device="cpu").source.endswith("network-snapshot-000002-ema0.9999.pt")
    assert DMDGenerator(out, device="cpu", ema="0.9996").source.endswith("network-snapshot-000002-ema0.9996.pt")
    with pytest.raises(GeneratorLoadError, match="choose one of 0.9996, 0.9999, 0.99995"):
        DMDGenerator(out, device="cpu", ema="10kimg")
    # A snapshot holds one network: another EMA is refused, its own accepted.
    snapshot = out / "network-snapshot-000002-ema0.9996.pt"
    assert DMDGenerator(snapshot, device="cpu", ema="0.99960").source == str(snapshot)
    with pytest.raises(GeneratorLoadError, match="a snapshot of the EMA 0.9996 alone, not --ema 0.9999"):
        DMDGenerator(snapshot, device="cpu", ema="0.9999")


def test_export_takes_an_ema_and_reports_its_own_fid(fastgen_run, tmp_path):
    from dmd.export import export_generator

    out, _ = fastgen_run
    fid = [r for r in read_stats(out) if "fid_0.9996" in r][-1]
    _, config = export_generator(out / "network-snapshot-000002-ema0.9996.pt", tmp_path / "snapshot")
    assert config["fid"]["value"] == fid["fid_0.9996"]
    assert config["selection"] == "the run's newest snapshot (network-snapshot-000002-ema0.9996.pt, step 2)"
    _, config = export_generator(out / "training-state-000002.pt", tmp_path / "state", ema="0.99995")
    assert config["fid"]["value"] == fid["fid_0.99995"]
    assert config["selection"] == "the generator of the training state of step 2 (its EMA 0.99995)"


def test_a_bad_ema_on_the_command_line_is_one_line(fastgen_run, tmp_path):
    out, _ = fastgen_run
    args = ["generate", "--network", out / "training-state-000002.pt", "--output-dir", tmp_path / "x", "--ema", "0.7"]
    result = run_cli(args, expect_ok=False)
    assert result.exit_code == 1 and "choose one of 0.9999, 0.99995, 0.9996, none" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_resume_with_three_emas_repeats_the_uninterrupted_run_and_refuses_another_list(fid_files, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(fastgen_args(straight, fid_files, 3))
    run_cli(fastgen_args(split, fid_files, 2))
    run_cli(fastgen_args(split, fid_files, 3, "--resume", "auto"))
    a, b = load(straight / "training-state-000003.pt"), load(split / "training-state-000003.pt")
    assert equal_weights(a["G"], b["G"]) and equal_weights(a["mu_fake"], b["mu_fake"])
    assert all(equal_weights(a["emas"][name], b["emas"][name]) for name in FASTGEN)
    assert a["best_fids"] == b["best_fids"]
    assert [{k: v for k, v in r.items() if k.startswith(("loss", "fid"))} for r in read_stats(straight)] == [
        {k: v for k, v in r.items() if k.startswith(("loss", "fid"))} for r in read_stats(split)
    ]
    result = run_cli(train_args(split, None, "--max-steps", 4, "--resume", "auto", "--ema", "0.9999"), False)
    assert "--ema cannot change within a run" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_half_life_equals_the_old_flag_and_an_old_state_resumes(tmp_path):
    """--ema 0.01kimg and --ema-halflife-kimg 0.01 are one run, with today's file names; a state in the layout
    written before several EMAs (G_ema alone, ema_halflife_kimg in its config) resumes bit for bit."""
    runs = {}
    for name, flag in (("new", ["--ema", "0.01kimg"]), ("old", ["--ema-halflife-kimg", "0.01"])):
        runs[name] = tmp_path / name
        run_cli(train_args(runs[name], None, "--max-steps", 2, "--batch-size", 2, "--checkpoint-every", 1, *flag))
    assert sorted(p.name for p in runs["new"].glob("network-snapshot-*")) == [
        "network-snapshot-000001.pt",
        "network-snapshot-000002.pt",
    ]
    one, two = (load(runs["new"] / f"training-state-00000{s}.pt") for s in (1, 2))
    assert equal_weights(two["G_ema"], lerped(one["G_ema"], two["G"], 0.5 ** (2 / 10)))  # batch 2, half-life 10
    old = load(runs["old"] / "training-state-000002.pt")
    assert old["config"]["ema"] == ["0.01kimg"] and equal_weights(old["G_ema"], two["G_ema"])
    assert equal_weights(load(runs["old"] / "network-snapshot-000002.pt")["state_dict"], two["G_ema"])

    # Rewrite step 1's state as an older dmd wrote it, then resume from it.
    legacy = runs["old"] / "training-state-000001.pt"
    state = load(legacy)
    del state["emas"], state["best_fids"], state["config"]["ema"]
    state["config"]["ema_halflife_kimg"] = 0.01
    torch.save(state, legacy)
    for path in runs["old"].glob("*-000002.pt"):
        path.unlink()
    (runs["old"] / "config.json").write_text(json.dumps(state["config"]))
    run_cli(train_args(runs["old"], None, "--max-steps", 2, "--batch-size", 2, "--resume", legacy))
    resumed = load(runs["old"] / "training-state-000002.pt")
    assert equal_weights(resumed["G_ema"], two["G_ema"]) and list(resumed["emas"]) == ["0.01kimg"]
    assert equal_weights(DMDGenerator(legacy, device="cpu", ema="0.01kimg").net.state_dict(), state["G_ema"])
