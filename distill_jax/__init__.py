"""distill_jax: guided diffusion distillation (Meng et al. 2022) in JAX/Flax."""

from distill_jax import xla_flags

__version__ = "0.1.0"

# Before any JAX backend starts: XLA reads XLA_FLAGS once, and JAX reads JAX_PLATFORMS when it
# is imported (see xla_flags).
xla_flags.apply()
xla_flags.cpu_without_accelerators()
