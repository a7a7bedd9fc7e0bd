"""The math layer: one-device Newton-Schulz (coefficients, precision, the iteration, the Gram kernels)."""
