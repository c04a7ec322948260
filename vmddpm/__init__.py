"""vmddpm: a reproducibility pipeline for VM-DDPM (Vision Mamba Diffusion for Medical Image Synthesis).

`import vmddpm` is cheap and needs no pipeline tool: submodules are imported where they are used
(`vmddpm.config`, `vmddpm.nn`, `vmddpm.diffusion`, ...).
"""

__version__ = "0.1.0"
