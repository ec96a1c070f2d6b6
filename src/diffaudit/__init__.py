"""diffaudit: audit Stable Diffusion U-Net representations for positional embeddings, corner artifacts
and high-norm anomalies (reproducing Loos & Linhardt, ICLR 2025 DeLTa)."""

__version__ = "0.1.0"
