"""EDM's architecture presets (train.py's --arch) and the configuration of its released CIFAR-10 teacher.

Each is a plain dict of constructor kwargs, so `build_network("EDMPrecond", dict(CIFAR10_COND, ...))` varies one.
"""

# --arch=ddpmpp: SongUNet with positional embedding and the standard encoder/decoder.
DDPMPP = dict(
    model_type="SongUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
    channel_mult=[2, 2, 2],
)

# --arch=ncsnpp: Fourier embedding, residual encoder, [1,3,3,1] resampling.
NCSNPP = dict(
    DDPMPP, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]
)

# --arch=adm: Dhariwal & Nichol's U-Net.
ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4])

# edm-cifar10-32x32-cond-vp.pkl: EDMPrecond + DDPM++, trained with augmentation (augment_dim 9) and dropout 0.13.
CIFAR10_COND = dict(
    img_resolution=32,
    img_channels=3,
    label_dim=10,
    use_fp16=False,
    sigma_min=0,
    sigma_max=float("inf"),
    sigma_data=0.5,
    augment_dim=9,
    dropout=0.13,
    **DDPMPP,
)
