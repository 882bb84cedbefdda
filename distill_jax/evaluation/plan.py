"""The evaluation's plan: which rows the table has (`plan`), grouped by evaluator.

The table is made by a list of evaluators (`EVALUATORS`), each a sampler spec producing rows:
- teacher_ddim: the teacher with guided DDIM at N in config.eval.teacher_steps (default 1, 2, 4,
  ..., n_start), 2N network evaluations per sample;
- student_ddim: every finished student (or those in config.eval.student_steps), deterministic
  (DDIM) at its N (stage one's student at n_start); on a stochastic run (config.stage2.stochastic)
  only stage one's, since the halving rounds train their students for the stochastic sampler;
- student_stochastic: the students with the distilled stochastic sampler when
  config.stage2.stochastic is set.
A new kind of model or sampler adds an `Evaluator`. Each guidance schedule named in
config.eval.guidance_schedules (e.g. 'interval:0.2,0.8', see `diffusion.guidance_schedule`) adds
the same rows with that schedule, as sampler 'NAME+SCHEDULE' (the teacher at its full step
count only); their FD to teacher is to the constant-w full-step teacher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np

from distill_jax import sampling
from distill_jax.diffusion.guidance_schedule import CONSTANT, GuidanceSchedule, parse_schedule
from distill_jax.run import Run


def teacher_step_counts(config: ml_collections.ConfigDict) -> list[int]:
    """config.eval.teacher_steps, or 1, 2, 4, ..., stage2.n_start when empty."""
    if config.eval.teacher_steps:
        return sorted({int(n) for n in config.eval.teacher_steps})
    counts, n = [], 1
    while n <= int(config.stage2.n_start):
        counts.append(n)
        n *= 2
    return counts


def student_step_counts(run: Run) -> list[int]:
    """Finished students' N (those in config.eval.student_steps, if set), largest first."""
    steps = sorted(run.students(), reverse=True)
    if run.config.eval.student_steps:
        wanted = {int(n) for n in run.config.eval.student_steps}
        steps = [n for n in steps if n in wanted]
    return steps


def _deterministic_student_step_counts(run: Run) -> list[int]:
    """Students trained for DDIM: all, or on a stochastic run only stage one's (N = n_start)."""
    if not run.config.stage2.stochastic:
        return student_step_counts(run)
    return [n for n in student_step_counts(run) if n == int(run.config.stage2.n_start)]


def _stochastic_student_step_counts(run: Run) -> list[int]:
    return student_step_counts(run) if run.config.stage2.stochastic else []


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A sampler spec producing rows: which model, which sampler, at which step counts.

    Attributes:
      name: the table's sampler column.
      model: 'teacher' (guided, any N) or 'student' (the finished student of that N).
      stochastic: ancestral steps for the teacher, the distilled stochastic sampler for a student.
      step_counts: run -> the N to measure.
    """

    name: str
    model: str
    stochastic: bool
    step_counts: Callable[[Run], list[int]]

    def entries(self, run: Run) -> list[Entry]:
        """Its rows: every step count x every evaluated w (students: w in the trained range).

        Then the same with each schedule of config.eval.guidance_schedules (the teacher: at
        its full step count only; students: where the schedule keeps every w in range).
        """
        weights = [float(w) for w in run.config.eval.guidance_weights]
        step_counts = self.step_counts(run)
        entries = [Entry(self, steps, w) for steps in step_counts for w in weights]
        for name in run.config.eval.guidance_schedules:
            schedule = parse_schedule(name)
            counts = step_counts if self.model == "student" else step_counts[-1:]
            entries += [Entry(self, n, w, schedule) for n in counts for w in weights]
        if self.model == "student":
            entries = [entry for entry in entries if entry.in_range(run)]
        return entries


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the table: an evaluator, its step count and a guidance weight."""

    evaluator: Evaluator
    steps: int
    w: float
    schedule: GuidanceSchedule = CONSTANT

    @property
    def sampler(self) -> str:
        """The table's sampler column: the evaluator's name, plus '+schedule' if not constant."""
        if self.schedule.kind == "constant":
            return self.evaluator.name
        return f"{self.evaluator.name}+{self.schedule.name}"

    @property
    def grid_name(self) -> str:
        """The file name of its sample grid."""
        name = self.sampler.replace(":", "_").replace(",", "-")
        return f"{name}_N{self.steps:04d}_w{self.w:g}.png"

    @property
    def weights(self) -> np.ndarray:
        """[steps] guidance weight of each step."""
        return self.schedule.weights(self.w, steps=self.steps)

    def in_range(self, run: Run) -> bool:
        """Whether every step's weight lies in the students' trained range."""
        return sampling.in_trained_range(run, self.weights)


EVALUATORS: list[Evaluator] = [
    Evaluator("teacher_ddim", "teacher", False, lambda run: teacher_step_counts(run.config)),
    Evaluator("student_ddim", "student", False, _deterministic_student_step_counts),
    Evaluator("student_stochastic", "student", True, _stochastic_student_step_counts),
]


def plan(run: Run) -> list[Entry]:
    """Every row to measure, grouped by (evaluator, steps) so each compiles once."""
    return [entry for evaluator in EVALUATORS for entry in evaluator.entries(run)]
