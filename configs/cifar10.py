"""CIFAR-10 (32x32x3, 10 classes), class-conditional, with the papers' hyperparameters.

Sources: the architecture, schedule, weighting and optimiser follow google-research
diffusion_distillation config/cifar_base.py (teacher) and config/cifar_distill.py (distillation
rounds: Adam lr 5e-5 annealed linearly over 50,000 steps per halving, no EMA, dropout 0);
Salimans & Ho (2022) Appendix. The guidance range [0, 4] and a 1024-step guided DDIM teacher
are those of Meng et al. (2022) Sec. 5.1 for pixel-space models. Their teacher is
class-conditional (label dropout p = 0.1, Ho & Salimans 2022). Stage-one length is our choice.
TFDS 'cifar10' must be prepared beforehand (needs TensorFlow: pip install -e .[tfds-prepare]).
"""

from distill_jax.config import base_config, optimizer_config


def get_config(variant: str = ""):
    """The CIFAR-10 config; `variant` is '' or 'smoke' (tiny model, few steps)."""
    c = base_config()
    c.data.name = "cifar10"
    c.model.kind = "unet"
    c.model.parameterisation = "x"  # cifar_base.py mean_type='x'
    c.model.channels = 256
    c.model.emb_dim = 1024
    c.model.channel_mult = (1, 1, 1)
    c.model.num_res_blocks = 3
    c.model.attn_resolutions = (8, 16)
    c.model.num_heads = 1
    c.model.dropout = 0.2
    c.model.dtype = "bfloat16"
    c.diffusion.loss_weighting = "truncated_snr"  # 'snr_trunc'
    c.guidance.w_min, c.guidance.w_max = 0.0, 4.0
    c.teacher.batch_size = 128
    c.teacher.num_steps = 800_000
    c.teacher.optimizer = optimizer_config(
        learning_rate=2e-4,
        warmup_steps=1000,
        decay="constant",
        weight_decay=0.001,
        grad_clip=1.0,
        ema_decay=0.9999,
    )
    c.stage1.batch_size = 128
    c.stage1.num_steps = 50_000
    c.stage1.optimizer = optimizer_config(
        learning_rate=1e-4, warmup_steps=0, decay="linear", grad_clip=1.0, ema_decay=0.9999
    )
    c.stage2.batch_size = 128
    c.stage2.n_start = 1024
    c.stage2.n_end = 1
    c.stage2.steps_per_round = 50_000
    c.stage2.final_rounds = 0
    c.stage2.optimizer = optimizer_config(
        learning_rate=5e-5, warmup_steps=0, decay="linear", grad_clip=1.0, ema_decay=0.0
    )
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.eval.num_samples = 50_000
    if variant == "smoke":
        c.model.channels = 16
        c.model.emb_dim = 0
        c.model.num_res_blocks = 1
        c.model.attn_resolutions = (8,)
        c.model.dtype = "float32"
        for stage in (c.teacher, c.stage1, c.stage2):
            stage.batch_size = 8
        c.teacher.num_steps = 4
        c.stage1.num_steps = 2
        c.stage2.n_start = 4
        c.stage2.steps_per_round = 2
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.eval.num_samples = 16
    elif variant:
        raise ValueError(
            f"configs/cifar10.py variant {variant!r} is unknown: accepted '', 'smoke'."
        )
    return c
