"""Default config: the bundled scikit-learn digits (8x8 grayscale, 10 classes).

Usage: --config=configs/digits.py (full default run) or --config=configs/digits.py:smoke
(a tiny end-to-end run for CI). Sizes are chosen so the whole run fits a 2-core CPU.
"""

from distill_jax.config import base_config


def get_config(variant: str = ""):
    """The digits config; `variant` is '' (default), 'smoke', 'stochastic' or 'schedules'.

    'stochastic' trains the halving rounds for the stochastic sampler, down to 2 steps.
    'schedules' changes only the evaluation (`distill-jax evaluate --config=...:schedules` on
    a default run): constant guidance against guidance intervals, for the full-step teacher and
    the 4- and 1-step students, over a finer sweep of w.
    """
    c = base_config()
    c.data.name = "digits"
    c.model.kind = "unet"
    c.model.parameterisation = "v"
    c.model.channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.num_heads = 2
    c.model.dropout = 0.1
    c.guidance.w_min, c.guidance.w_max = 0.0, 4.0  # pixel-space range of Meng et al.
    # Budget: the whole run (teacher, stage one, five halving rounds 32 -> 1, evaluation)
    # in 27-30 minutes on a 2-core CPU (README). 32 guided DDIM steps are already close to the
    # teacher's converged samples on 8x8 digits.
    c.teacher.batch_size = 128
    c.teacher.num_steps = 2500
    # Stage one decides most of how far the students end up from the teacher (README ablation):
    # at 600 steps and lr 5e-4 it was under-trained, and uniform w left both ends of the range
    # worst. 1200 steps at lr 2e-3 with w ~ 4 * Beta(0.5, 0.5) cut its FD to the teacher by
    # 2-4x at every w; the rounds keep uniform w (Beta(0.5, 0.5) there lost in the middle).
    # w = 4 stayed worst, limited by gradient noise, not capacity: batch 256 instead of 128
    # (about 4.5 more minutes) cut stage one's FD to the teacher there by a quarter and the
    # 4-step student's by a third; twice the rounds' batch helped the 1-step student more than
    # the 4-step one, for 4.3 more minutes, so the rounds keep 64 (README ablation).
    c.stage1.batch_size = 256
    c.stage1.num_steps = 1200
    c.stage1.optimizer.learning_rate = 2e-3
    c.stage1.w_beta = 0.5
    c.stage2.batch_size = 64
    c.stage2.n_start = 32
    c.stage2.n_end = 1
    c.stage2.steps_per_round = 500  # 300 in rounds 16 and 8 added FD to the teacher at w = 4
    # The last two rounds (students of 2 and 1 steps) at twice the learning rate: the 1-step
    # student a fifth closer to the teacher at w = 0 and 1, the 4-step one unchanged (README
    # ablation; 1e-3 in every round moved the 4-step student away at w = 4).
    c.stage2.final_rounds = 2
    c.stage2.final_steps_per_round = 500
    c.stage2.final_learning_rate = 1e-3
    c.eval.num_samples = 300  # as many as the test split holds
    c.eval.seeds = 2
    # The full-step teacher (the students' reference) and the 4-step one beside the 4-step
    # student; the teacher at every other N (1, 2, 8, 16) added about 45% to the sampling.
    c.eval.teacher_steps = (32, 4)
    if variant == "smoke":
        # One resolution level with attention: the pipeline's plumbing at 40% less XLA
        # compilation than the default's two levels (a smoke run 55 s against 88 s here); the
        # down- and up-sampling path is tested in tests/test_models.py.
        c.model.channels = 16
        c.model.channel_mult = (1,)
        c.model.attn_resolutions = (8,)
        c.model.num_heads = 1
        c.teacher.batch_size = 32
        c.teacher.num_steps = 20
        c.stage1.batch_size = 32
        c.stage1.num_steps = 10
        c.stage2.batch_size = 32
        c.stage2.n_start = 8
        c.stage2.steps_per_round = 5
        c.stage2.final_rounds = 1
        c.stage2.final_steps_per_round = 5
        c.train.log_every = 5
        c.train.checkpoint_every = 10
        c.eval.num_samples = 64
        c.eval.seeds = 1
        c.eval.guidance_weights = (0.0, 2.0)
        c.eval.teacher_steps = (2, 8)
    elif variant == "stochastic":
        # The paper's stochastic sampler: rounds 32 -> 2 train each student for jumps of 2/N
        # (`distill --teacher=` of a default run's teacher; evaluated with that sampler).
        c.stage2.stochastic = True
        c.stage2.n_end = 2
        c.stage2.final_rounds = 2
        c.stage2.final_learning_rate = 0.0  # measured with 5e-4 in every round (README)
        c.eval.teacher_steps = (32,)
        c.eval.student_steps = (32, 8, 4, 2)
    elif variant == "schedules":
        c.eval.guidance_weights = (0.3, 0.6, 1.0, 1.5, 2.0, 3.0, 4.0)
        c.eval.teacher_steps = (32,)
        c.eval.student_steps = (4, 1)
        # Kynkaanniemi et al.'s EDM2 interval, sigma in (0.28, 5.42], is t in (0.17, 0.88] on
        # the cosine schedule; the second one only leaves out the noisiest steps.
        c.eval.guidance_schedules = ("interval:0.17,0.88", "interval:0,0.7")
    elif variant:
        raise ValueError(
            f"configs/digits.py variant {variant!r} is unknown: accepted '', 'smoke', "
            "'stochastic', 'schedules'."
        )
    return c
