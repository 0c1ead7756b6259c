"""dmd: Distribution Matching Distillation (Yin et al., CVPR 2024) of EDM diffusion models into one-step generators.

The public API, importable from here (`from dmd import DMDGenerator, load_network, edm_sampler`): each name is
imported from its module on first use (PEP 562), so `import dmd` alone, which the command line does for its
version, does not import torch.
"""

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "DMDGenerator": "dmd.generate",
    "GeneratorLoadError": "dmd.generate",
    "load_network": "dmd.edm.persistence",
    "edm_sampler": "dmd.edm.sampler",
    "calc_fid": "dmd.fid",
    "calc_metrics": "dmd.fid",
    "export_generator": "dmd.export",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dmd' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
