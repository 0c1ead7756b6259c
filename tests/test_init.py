"""The package's own namespace: the public API from `dmd` itself, imported lazily so `import dmd` stays light."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dmd

ROOT = Path(__file__).resolve().parents[1]


def test_import_dmd_does_not_import_torch():
    """The command line imports dmd for its version; that alone must not pay for torch (seconds on a cold cache)."""
    script = "import sys, dmd; print(dmd.__version__, 'torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert done.stdout == f"{dmd.__version__} False\n"


def test_the_public_api_imports_from_dmd():
    from dmd import DMDGenerator, GeneratorLoadError, calc_fid, edm_sampler, export_generator, load_network
    from dmd.edm.persistence import load_network as loader
    from dmd.edm.sampler import edm_sampler as sampler
    from dmd.export import export_generator as exporter
    from dmd.fid import calc_fid as fid
    from dmd.generate import DMDGenerator as generator
    from dmd.generate import GeneratorLoadError as error

    assert (DMDGenerator, GeneratorLoadError, calc_fid, edm_sampler, export_generator, load_network) == (
        generator, error, fid, sampler, exporter, loader,
    )  # fmt: skip
    assert set(dmd.__all__) <= set(dir(dmd))
    assert {"DMDGenerator", "load_network", "edm_sampler", "calc_fid"} <= set(dmd.__all__)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="module 'dmd' has no attribute 'DMDGenrator'"):
        dmd.DMDGenrator  # noqa: B018
    with pytest.raises(ImportError):
        from dmd import nothing_here  # noqa: F401
