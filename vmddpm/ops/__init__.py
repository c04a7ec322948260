"""Layer 1: numerical kernels (the S6 selective scan and its backends)."""
