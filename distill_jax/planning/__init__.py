"""Planning pod runs before renting them (`distill-jax plan`).

The real train steps and samplers of a config, at their real sizes, compiled ahead of time for
a TPU slice's abstract devices on a machine without TPUs (libtpu describes the slice):
per-chip memory against HBM, FLOPs and bytes from XLA's cost analysis, a roofline time, images
per second per chip and each stage's predicted time. See docs/pod_planning.md.
"""

from distill_jax.planning.plan import parse_mesh, plan_run, write_plan
from distill_jax.planning.report import format_plan

__all__ = ["format_plan", "parse_mesh", "plan_run", "write_plan"]
