"""Install `dmd`: Distribution Matching Distillation of EDM diffusion models into one-step generators."""

from setuptools import find_packages, setup

setup(
    name="dmd-distill",  # "dmd" on PyPI is an unrelated package; the import name and the command stay dmd
    version="0.1.0",
    description="One-step image generation by Distribution Matching Distillation (DMD) of EDM diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="CC BY-NC-SA 4.0",
    python_requires=">=3.9",
    packages=find_packages(include=["dmd", "dmd.*"]),
    package_data={"dmd": ["assets/*"]},
    include_package_data=True,
    # torch is left unpinned on purpose: install the build that fits your machine first
    # (the README's CPU instructions do `pip install torch==2.13.0`).
    install_requires=[
        "torch>=2.4",  # fused AdamW on CPU (the loop skips a non-finite step inside it)
        "numpy",
        "click>=8.0",
        "h5py",
        "pillow>=8.0",  # Image.open(formats=...): images are decoded as PNG only
        "scipy",
        "requests",
        "tqdm",
        "safetensors",  # the weights of `dmd export` folders, which DMDGenerator reads without an extra
    ],
    extras_require={
        "neptune": ["neptune>=1.0"],
        "tensorboard": ["tensorboard"],  # --log-tensorboard (torch.utils.tensorboard writes the event files)
        "wandb": ["wandb"],  # --log-wandb
        "plot": ["matplotlib"],  # dmd plot
        "demo": ["scikit-learn"],
        "hub": ["huggingface_hub"],  # hf://user/repo in DMDGenerator and --network, dmd export --push
        "latent": ["diffusers"],  # EDM2's latent teachers: the Stable Diffusion VAE (--vae)
        # FD_DINOv2 (--metrics fd_dinov2): transformers' DINOv2, not timm's, because timm needs torchvision, whose
        # CUDA wheels do not load beside the CPU build of torch (no CPU torchvision on PyPI).
        "dinov2": ["transformers"],
        "test": [
            "pytest",
            "ruff==0.17.6",
            "scikit-learn",
            "neptune>=1.0",
            "tensorboard",
            "matplotlib",
            "huggingface_hub",
            "wandb",
            "diffusers",
            "transformers",
        ],
    },
    entry_points={"console_scripts": ["dmd=dmd.cli:main"]},
)
