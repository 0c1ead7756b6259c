"""`dmd export`: the exported folder, its reload (same images), its model card, its checks, the Hub without network."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dmd.checkpoint import save_snapshot
from dmd.cli import main
from dmd.config import TrainConfig
from dmd.edm.persistence import load_network
from dmd.export import export_generator
from dmd.generate import DMDGenerator, GeneratorLoadError

ROOT = Path(__file__).resolve().parents[1]
TEACHER = Path(__file__).parent / "fixtures" / "edm_ddpmpp_cond.pkl"  # EDMPrecond, 8x8, 10 classes
TEACHER_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl"
TEACHER_SHA = "ab" * 32
SEEDS = [0, 1, 2, 3, 17]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as `dmd train` leaves it: config.json, stats.jsonl with a FID, a training state, two snapshots
    (the newest a two-step generator), made with the package's own snapshot writer."""
    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        model_path=TEACHER_URL, output_dir=str(run), lambda_reg=0, max_steps=20, generator_sigmas=(80, 1.5),
        fid_every=10, fid_num=40, fid_ref="/home/someone/refs/cifar10-32x32.npz", recipe="dmd2",
    )  # fmt: skip
    (run / "config.json").write_text(cfg.to_json())
    stats = [
        {"step": 10, "kimg": 0.56, "loss_dm": 0.3},
        {"step": 10, "fid": 31.25, "kimg": 0.56},
        {"step": 20, "kimg": 1.12, "loss_dm": 0.2},
        {"step": 20, "fid": 27.5, "kimg": 1.12},
    ]
    text = "".join(json.dumps(r) + "\n" for r in stats)
    (run / "stats.jsonl").write_text(text + '{"step": 30, "fi')  # a killed run's torn last line
    torch.save(
        {"format": "dmd-training-state", "fingerprints": {"teacher": TEACHER_SHA}}, run / "training-state-000020.pt"
    )
    net = load_network(TEACHER)
    for step, scale in ((10, 0.5), (20, 1.0)):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(scale)
        save_snapshot(run / f"network-snapshot-{step:06d}.pt", net, generator_sigmas=cfg.generator_sigmas, step=step,
                      config=cfg.to_dict())  # fmt: skip
    return run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    dest = tmp_path_factory.mktemp("exports") / "student"
    result = CliRunner().invoke(main, ["export", str(run / "network-snapshot-000020.pt"), str(dest), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (
        result.output == f"{dest}: network-snapshot-000020.pt as fp32 safetensors, model card (FID 27.500 at step 20)\n"
    )
    return dest


def test_export_reloads_to_the_same_images(run, exported, tmp_path):
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "samples.png",
    ]
    original = DMDGenerator(run / "network-snapshot-000020.pt", device="cpu")
    reloaded = DMDGenerator(exported, device="cpu")
    assert reloaded.sigmas == [80.0, 1.5] and reloaded.source == str(exported)
    assert torch.equal(reloaded.generate_batch(seeds=SEEDS), original.generate_batch(seeds=SEEDS))  # same weights

    # `generate --network FOLDER` writes the same PNGs as from the snapshot.
    for name, network in (("a", run / "network-snapshot-000020.pt"), ("b", exported)):
        args = ["generate", "--network", str(network), "--output-dir", str(tmp_path / name), "--seeds", "5"]
        assert CliRunner().invoke(main, [*args, "--device", "cpu"]).exit_code == 0
    assert (tmp_path / "a" / "000005.png").read_bytes() == (tmp_path / "b" / "000005.png").read_bytes()
    samples = PIL.Image.open(exported / "samples.png")
    assert samples.mode == "RGB" and samples.size[0] > 10 * 8


def test_config_records_what_the_run_recorded(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "dmd-export" and config["version"] == 1 and config["dtype"] == "fp32"
    assert config["class_name"] == "EDMPrecond" and config["init_kwargs"]["img_resolution"] == 8
    assert config["generator_sigmas"] == [80.0, 1.5]
    assert config["teacher"] == {"name": TEACHER_URL, "sha256": TEACHER_SHA}
    assert config["training"] == {"recipe": "dmd2", "step": 20, "kimg": 1.12}
    assert config["fid"] == {
        "value": 27.5, "step": 20, "num_images": 40, "seeds": "0-39", "reference": "cifar10-32x32.npz",
        "detector": "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    }  # fmt: skip
    assert config["selection"] == "the run's newest snapshot (network-snapshot-000020.pt, step 20)"
    assert "/home/someone" not in (exported / "config.json").read_text()  # local paths by their names only

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    strict = json.loads((exported / "config.json").read_text(), parse_constant=refuse)  # no Infinity, no NaN
    assert strict["init_kwargs"]["sigma_max"] == float("inf")  # EDMPrecond's, written as 1e999


def test_model_card(exported):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-nc-sa-4.0\n")
    assert "# A 2-step generator distilled from edm-cifar10-32x32-cond-vp.pkl\n" in card
    assert "2 steps (sigmas 80, 1.5)" in card and "DMD2 (Yin et al., NeurIPS 2024)" in card
    assert 'from dmd import DMDGenerator\nG = DMDGenerator("path/to/student")\nimages = G.generate_batch(' in card
    assert "FID 27.500 at step 20" in card and "40 generated images (seeds 0-39, seed s of class s % 10)" in card
    assert "The standard protocol uses 50,000 images" in card and "![samples](samples.png)" in card
    assert "CC BY-NC-SA 4.0, inherited from the teacher `edm-cifar10-32x32-cond-vp.pkl`" in card

    # The card's three lines of Python run as written.
    code = card.split("```python\n")[1].split("```")[0].replace("path/to/student", str(exported))
    namespace = {}
    exec(code, namespace)
    assert namespace["images"].shape == (16, 3, 8, 8)


def test_selection_fid_and_licence_follow_the_source(run, tmp_path):
    best = run / "network-snapshot-best.pt"
    shutil.copy(run / "network-snapshot-000010.pt", best)
    try:
        _, config = export_generator(best, tmp_path / "best")
    finally:
        best.unlink()
    assert config["fid"]["value"] == 31.25 and config["selection"].startswith("the run's lowest FID among")
    card = (tmp_path / "best" / "README.md").read_text()
    assert "so that number is optimistic" in card

    # An older snapshot, no FID at its step in another folder, a teacher that is not one of EDM's networks.
    other = tmp_path / "other"
    other.mkdir()
    snapshot = torch.load(run / "network-snapshot-000010.pt", weights_only=True)
    snapshot["config"]["model_path"] = "/data/my-teacher.pkl"
    torch.save(snapshot, other / "network-snapshot-000010.pt")
    shutil.copy(run / "network-snapshot-000020.pt", other / "network-snapshot-000020.pt")
    _, config = export_generator(other / "network-snapshot-000010.pt", tmp_path / "old")
    assert config["fid"] is None and config["teacher"] == {"name": "my-teacher.pkl", "sha256": None}
    assert config["training"]["kimg"] is None and "chosen by hand" in config["selection"]
    card = (tmp_path / "old" / "README.md").read_text()
    assert "license: other" in card and "The same as the teacher's (`my-teacher.pkl`)" in card
    assert "The run recorded no FID for this snapshot" in card


def test_a_training_state_exports_its_generator(run, tmp_path):
    snapshot = torch.load(run / "network-snapshot-000020.pt", weights_only=True)
    state = {
        **{k: snapshot[k] for k in ("class_name", "init_kwargs", "generator_sigmas", "config")},
        "format": "dmd-training-state", "version": 2, "G": snapshot["state_dict"], "G_ema": None, "step": 30,
        "global_batch": {"batch_size": 56}, "fingerprints": {"teacher": "cd" * 32},
    }  # fmt: skip
    (tmp_path / "run").mkdir()
    torch.save(state, tmp_path / "run" / "training-state-000030.pt")
    _, config = export_generator(tmp_path / "run" / "training-state-000030.pt", tmp_path / "out")
    assert config["training"] == {"recipe": "dmd2", "step": 30, "kimg": 30 * 56 / 1000}
    assert config["teacher"]["sha256"] == "cd" * 32 and config["fid"] is None
    assert config["selection"] == "the generator of the training state of step 30 (G itself)"


def test_a_run_folder_exports_its_newest_snapshot(run, tmp_path):
    _, config = export_generator(run, tmp_path / "newest")
    assert config["source"] == "network-snapshot-000020.pt"


def test_bf16_weights_give_close_images(run, exported, tmp_path):
    args = ["export", str(run / "network-snapshot-000020.pt"), str(tmp_path / "bf16"), "--dtype", "bf16"]
    assert CliRunner().invoke(main, [*args, "--device", "cpu"]).exit_code == 0
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    net = DMDGenerator(exported, device="cpu").net
    parameters = {name for name, _ in net.named_parameters()}
    assert {str(v.dtype) for k, v in weights.items() if k in parameters} == {"torch.bfloat16"}
    assert {str(v.dtype) for k, v in weights.items() if k not in parameters} == {"torch.float32"}  # buffers
    assert os.path.getsize(tmp_path / "bf16" / "model.safetensors") < 0.6 * os.path.getsize(
        exported / "model.safetensors"
    )
    fp32 = DMDGenerator(exported, device="cpu").generate_batch(seeds=SEEDS)
    bf16 = DMDGenerator(tmp_path / "bf16", device="cpu").generate_batch(seeds=SEEDS)
    difference = (bf16 - fp32).abs().max().item()
    assert 0 < difference < 0.05, difference


def test_the_destination_is_new_or_empty_and_written_atomically(run, tmp_path, monkeypatch):
    snapshot = str(run / "network-snapshot-000020.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a person's file")
    result = CliRunner().invoke(main, ["export", snapshot, str(tmp_path / "full")])
    assert result.exit_code == 2 and "exists and is not an empty folder" in result.output
    assert sorted(os.listdir(tmp_path / "full")) == ["mine.txt"]

    (tmp_path / "empty").mkdir()
    export_generator(snapshot, tmp_path / "empty")  # an empty folder is taken
    assert (tmp_path / "empty" / "model.safetensors").is_file()

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dmd.export.model_card", fail)
    result = CliRunner().invoke(main, ["export", snapshot, str(tmp_path / "cut")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "No space left on device" in result.output
    assert sorted(os.listdir(tmp_path)) == ["empty", "full"]  # no half-written folder, no temporary one

    old = os.umask(0o027)
    try:
        monkeypatch.undo()
        export_generator(snapshot, tmp_path / "shared")
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "shared" / "config.json").stat().st_mode & 0o777 == 0o640


def test_only_runs_of_dmd_train_are_exported(tmp_path):
    result = CliRunner().invoke(main, ["export", str(TEACHER), str(tmp_path / "x")])
    assert result.exit_code == 1 and "not a snapshot or training state of `dmd train`" in result.output
    assert not (tmp_path / "x").exists()


def _write(folder, config=None, weights=None):
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        save_file(weights, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"config": "{not json"}, r"config.json: not readable JSON \(Expecting property name"),
        ({"config": "[" * 100000 + "]" * 100000}, r"config.json: not readable JSON \(nested too deeply\)"),
        ({"config": {"format": "dmd-snapshot"}}, r"config.json: not the config of `dmd export`"),
        ({"version": 2}, r"config.json: version 2; this dmd reads 1 to 1"),
        ({"class_name": "Evil"}, r"config.json: network class 'Evil' is not one of EDMPrecond"),
        ({"init_kwargs": {"num_blocks": 10**6}}, r"config.json: cannot build EDMPrecond: 'num_blocks' must be"),
        (
            {"init_kwargs": {"model_channels": 32}},
            r"config.json: the weights do not fit the EDMPrecond .* size mismatch",
        ),
        ({"generator_sigmas": [float("nan")]}, r"config.json: generator_sigmas: noise levels must be finite"),
        ({"generator_sigmas": [1e308]}, r"config.json: generator_sigmas: noise level 1e\+308 is above 10000"),
        (
            {"drop_weight": True},
            r"config.json: the weights do not fit the EDMPrecond .*: 1 missing \(model.map_augment",
        ),
        ({"weights": b"\x00" * 40}, r"model.safetensors: not a readable safetensors file"),
        ({"delete": "config.json"}, r"folder: no config.json; a folder of `dmd export` holds model.safetensors and"),
        ({"delete": "model.safetensors"}, r"folder: a folder without a network snapshot .* or an exported model"),
    ],
)
def test_a_bad_folder_is_one_line_naming_the_file(exported, tmp_path, change, message):
    folder = tmp_path / "folder"
    shutil.copytree(exported, folder)
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    if "config" in change:
        _write(folder, config=change["config"])
    for key in ("version", "class_name", "generator_sigmas"):
        if key in change:
            _write(folder, config={**config, key: change[key]})
    if "init_kwargs" in change:
        _write(folder, config={**config, "init_kwargs": {**config["init_kwargs"], **change["init_kwargs"]}})
    if "drop_weight" in change:
        _write(folder, weights={k: v for k, v in weights.items() if not k.startswith("model.map_augment")})
    if "weights" in change:
        (folder / "model.safetensors").write_bytes(change["weights"])
    if "delete" in change:
        (folder / change["delete"]).unlink()
    with pytest.raises(GeneratorLoadError, match=message) as error:
        DMDGenerator(folder, device="cpu")
    assert "\n" not in str(error.value) and len(str(error.value)) < 400


def _hub_cache(hf_home, repo, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout for the model repository `repo` at `commit`, the `main` ref pointing there."""
    storage = Path(hf_home) / "hub" / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files:
        shutil.copy(path, snapshot / Path(path).name)


def test_hub_repository_loads_from_the_offline_cache(exported, tmp_path):
    """hf://user/repo loads from huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network: the cache is laid out as
    huggingface_hub lays it); a repository not in the cache is one line. Run in a subprocess, as a user would run
    it, because huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported."""
    _hub_cache(tmp_path / "hf", "someone/student", [exported / "config.json", exported / "model.safetensors"])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    script = (
        "import sys, torch\n"
        "from dmd import DMDGenerator, GeneratorLoadError\n"
        "G = DMDGenerator('hf://someone/student', device='cpu')\n"
        f"torch.save(G.generate_batch(seeds={SEEDS}), sys.argv[1])\n"
        "print(G.source)\n"
        "try:\n"
        "    DMDGenerator('hf://someone/missing', device='cpu')\n"
        "except GeneratorLoadError as e:\n"
        "    print(e)\n"
    )
    out = tmp_path / "images.pt"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    source, missing = done.stdout.splitlines()
    assert source == "hf://someone/student"
    assert missing.startswith("hf://someone/missing: Cannot find an appropriate cached snapshot folder")
    expected = DMDGenerator(exported, device="cpu").generate_batch(seeds=SEEDS)
    assert torch.equal(torch.load(out, weights_only=True), expected)


@pytest.mark.parametrize("name", ["hf://nobody", "hf://a/b/c", "hf:// a/b"])
def test_malformed_hub_names_are_refused(name):
    with pytest.raises(GeneratorLoadError, match="not a Hub repository; write hf://user/repo"):
        DMDGenerator(name, device="cpu")


def test_a_missing_user_repo_path_points_to_the_hub_syntax(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GeneratorLoadError, match="no such file: someone/student; a Hub repository is written hf://"):
        DMDGenerator("someone/student", device="cpu")


def test_push_uploads_the_folder(run, tmp_path, monkeypatch):
    """--push with HfApi's two methods replaced by recorders (no network): the repository is created if missing and
    the exported folder uploaded; the card names the repository; a refused upload is one line and keeps the folder."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, *a, **k: calls.append(("create", a, k)) or "https://hub.test/someone/student",
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k)))
    dest = tmp_path / "student"
    args = ["export", str(run / "network-snapshot-000020.pt"), str(dest), "--push", "someone/student", "--private"]
    result = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.endswith(f"{dest}: uploaded to https://hub.test/someone/student\n")
    assert calls == [
        ("create", ("someone/student",), {"repo_type": "model", "exist_ok": True, "private": True}),
        ("upload", {"folder_path": str(dest), "repo_id": "someone/student", "repo_type": "model",
                    "commit_message": "Upload a dmd export"}),
    ]  # fmt: skip
    assert 'G = DMDGenerator("hf://someone/student")' in (dest / "README.md").read_text()

    def refuse(self, **k):
        raise huggingface_hub.errors.LocalTokenNotFoundError(
            "Token is required (`token=True`), but no token found.\nmore"
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    result = CliRunner().invoke(main, [*args[:2], str(tmp_path / "again"), "--push", "someone/student"])
    exported_line, error = result.output.splitlines()  # the folder is written, then the upload refused
    assert result.exit_code == 1 and exported_line.startswith(f"{tmp_path / 'again'}: network-snapshot-000020.pt")
    assert error == "Error: --push someone/student: Token is required (`token=True`), but no token found."
    assert (tmp_path / "again" / "model.safetensors").is_file()

    result = CliRunner().invoke(main, [*args[:2], str(tmp_path / "never"), "--push", "not a/valid id"])
    assert result.exit_code == 2 and "--push not a/valid id: Repo id must" in result.output
    assert not (tmp_path / "never").exists()  # refused before any work
