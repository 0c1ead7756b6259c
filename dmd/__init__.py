"""dmd: Distribution Matching Distillation (Yin et al., CVPR 2024) of EDM diffusion models into one-step generators."""

__version__ = "0.1.0"
