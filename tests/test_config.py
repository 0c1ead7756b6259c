"""TrainConfig: JSON round trip, immutability, and one clear error per bad value naming its flag."""

import dataclasses
import json

import pytest

from dmd.config import ConfigError, TrainConfig, field_name, flag_name

BASE = dict(model_path="teacher.pkl", output_dir="run", data_path="pairs.h5", max_steps=10)


def test_json_round_trip_keeps_every_field():
    cfg = TrainConfig(**BASE, betas=[0.5, 0.99], ema="500kimg,0.999", precision="bf16", resume="auto")
    back = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    assert back.betas == (0.5, 0.99)
    assert json.loads(cfg.to_json())["betas"] == [0.5, 0.99]


def test_defaults_are_the_papers():
    cfg = TrainConfig(**BASE)
    assert (cfg.lr_gen, cfg.lr_fake, cfg.weight_decay, cfg.betas) == (5e-5, 5e-5, 0.01, (0.9, 0.999))
    assert (cfg.batch_size, cfg.lambda_reg, cfg.grad_clip, cfg.generator_sigmas) == (56, 0.25, 10.0, (80.0,))
    assert (cfg.dropout, cfg.fake_steps_per_gen, cfg.t_min, cfg.t_max, cfg.ema) == (0, 1, 0.02, 0.98, ())


def test_config_is_frozen():
    cfg = TrainConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr_gen = 1.0


@pytest.mark.parametrize(
    "change, flag",
    [
        (dict(max_steps=None), "--max-steps"),
        (dict(epochs=2), "--epochs"),
        (dict(max_steps=None, epochs=2, data_path=None, lambda_reg=0), "--data-path"),
        (dict(data_path=None), "--lambda-reg"),
        (dict(batch_size=0), "--batch-size"),
        (dict(fake_steps_per_gen=0), "--fake-steps-per-gen"),
        (dict(dropout=1.0), "--dropout"),
        (dict(precision="fp16"), "--precision"),
        (dict(fake_sigma_sampling="uniform"), "--fake-sigma-sampling"),
        (dict(ema="-1kimg"), "--ema"),
        (dict(max_bad_steps=0), "--max-bad-steps"),
        (dict(workers=-1), "--workers"),
        (dict(lambda_dm=-1), "--lambda-dm"),
        (dict(lambda_dm=0, lambda_reg=0), "--lambda-dm"),
        (dict(regression_distance="l1"), "--regression-distance"),
    ],
)
def test_bad_values_name_their_flag(change, flag):
    with pytest.raises(ConfigError, match=flag):
        TrainConfig(**{**BASE, **change})


def test_regression_off_needs_no_pairs():
    cfg = TrainConfig(model_path="t.pkl", output_dir="run", max_steps=1, lambda_reg=0)
    assert cfg.data_path is None


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="unknown config keys: lr"):
        TrainConfig.from_dict({**TrainConfig(**BASE).to_dict(), "lr": 1.0})


def test_flag_names_are_the_commands_flags():
    """Errors name the flag a user types: --network for the teacher (the field keeps the name model_path)."""
    from click.testing import CliRunner

    from dmd.cli import main

    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for field in dataclasses.fields(TrainConfig):
        flag = flag_name(field.name)
        assert field_name(flag) == field.name and field_name(flag[2:]) == field.name
        if field.name not in ("betas", "num_timesteps", "lpips_pretrained"):  # Python API only (--lpips-random)
            assert f"  {flag} " in help_text or f"  {flag}\n" in help_text, flag
    assert flag_name("model_path") == "--network" and field_name("lr-gen") == "lr_gen"
