"""Pure diffusion math: schedule, parameterisations, guidance, samplers, losses, targets.

No Flax and no I/O: every function takes arrays and a `denoise_fn(z, t, labels, w) -> xhat`.
"""
