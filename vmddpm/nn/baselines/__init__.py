"""Baseline networks of the paper's comparison (DDPM U-Net, DiT, DCGAN/WGAN-GP)."""
