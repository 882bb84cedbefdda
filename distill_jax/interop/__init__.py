"""Readers of teachers trained elsewhere (diffusers folders) into this library's networks."""
