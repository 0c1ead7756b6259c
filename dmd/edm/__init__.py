"""EDM-compatible core: networks, preconditioners, a safe loader for EDM's and EDM2's pickles, and the sampler of both
with guidance (EDM2's own network family lives in dmd.edm2)."""

# Networks, preconditioners, the EDM pickle loader/writer and EDM's sampler (re-exported).
from dmd.edm.layers import (  # noqa: F401
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    weight_init,
)
from dmd.edm.persistence import (  # noqa: F401
    NetworkLoadError,
    UnsafePickleError,
    load_network,
    network_fingerprint,
)
from dmd.edm.precond import (  # noqa: F401
    PRECONDITIONERS,
    EDMPrecond,
    VEPrecond,
    VPPrecond,
    build_network,
    copy_network,
    iDDPMPrecond,
)
from dmd.edm.sampler import GuidedDenoiser, StackedRandomGenerator, check_guide, edm_sampler  # noqa: F401
from dmd.edm.unets import DhariwalUNet, SongUNet  # noqa: F401
from dmd.edm.writer import save_network_pickle  # noqa: F401
