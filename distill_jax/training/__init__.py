"""Train state, the generic training loop and the stage step functions."""
