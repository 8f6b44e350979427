"""GPU kernels, each beside its plain-PyTorch reference; ``dispatch`` picks one per device type."""
