"""EDM2's network family (Karras et al. 2024): magnitude-preserving layers, the U-Net, its preconditioner and what
its pickles say about the encoder. `dmd.edm.load_network` reads EDM2's pickles into these classes, and
`dmd.edm.edm_sampler` samples them as EDM2's generate_images.py does."""

from dmd.edm2.encoders import ENCODERS, EncoderInfo  # noqa: F401
from dmd.edm2.layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample  # noqa: F401
from dmd.edm2.networks import Block, Precond, UNet  # noqa: F401
