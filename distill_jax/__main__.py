"""`python -m distill_jax` runs the command line."""

from distill_jax.cli import run_main

run_main()
