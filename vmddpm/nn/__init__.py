"""Layer 2: networks, forward(x, t) -> eps (GANs: G(z), D(x)); no file I/O, no config parsing."""
