"""EDM2's encoder attributes, read as data: EDM2's defaults come back exactly, anything else is one ValueError."""

import numpy as np
import pytest

from dmd.edm2 import EncoderInfo

SCALE = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])  # EDM2's defaults: final_std / raw_std
VAE = dict(vae_name="stabilityai/sd-vae-ft-mse", scale=SCALE, bias=-np.float32([5.81, 3.25, 0.12, -2.15]) * SCALE)


def test_edm2_defaults_are_kept_exactly():
    info = EncoderInfo.from_attributes("StabilityVAEEncoder", dict(VAE, batch_size=8, _vae=None), channels=4)
    assert info.scale == tuple(SCALE.tolist()) and info.bias == tuple(VAE["bias"].tolist()) and info.batch_size == 8
    assert np.array_equal(np.float32(info.scale), SCALE)  # float32 values, as EDM2 applies them
    assert EncoderInfo.from_attributes("StandardRGBEncoder", {}, channels=3) == EncoderInfo("StandardRGBEncoder")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(scale=SCALE[:3]), "'scale' is not 4 floats"),
        (dict(scale=list(SCALE)), "'scale' is not 4 floats"),
        (dict(bias=np.int32([1, 2, 3, 4])), "'bias' is not 4 floats"),
        (dict(scale=np.float32([1, 0, 1, 1])), "'scale' holds a zero"),
        (dict(bias=np.float32([1, np.nan, 1, 1])), "'bias' holds a zero, an inf or a NaN"),
        (dict(vae_name=None), "'vae_name'"),
        (dict(batch_size=True), "'batch_size'"),
    ],
)
def test_bad_attributes_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        EncoderInfo.from_attributes("StabilityVAEEncoder", {**VAE, "batch_size": 8, **change}, channels=4)
    with pytest.raises(ValueError, match="'encoder' is a TAESD, not one of EDM2's"):
        EncoderInfo.from_attributes("TAESD", VAE, channels=4)
