"""ImageNet 64x64 (TFDS imagenet_resized/64x64, 1000 classes), class-conditional.

Sources: google-research diffusion_distillation config/imagenet64_base.py (teacher: ch 192,
mult (1, 2, 3, 4), 3 res blocks, attention at 8/16/32, dropout 0.1,
mean_type 'both', batch 2048, Adam lr 3e-4 with 1000 warmup steps, EMA 0.9999) and
config/imagenet64_distill.py (rounds: lr 1e-4 linear anneal over 50,000 steps per halving, no
EMA, dropout 0, N from 1024 to 1). Guidance range [0, 4] and the 1024-step guided teacher:
Meng et al. (2022) Sec. 5.1. Stage-one length is our choice. The dataset must be prepared
beforehand (needs TensorFlow: pip install -e .[tfds-prepare]).
"""

from distill_jax.config import base_config, optimizer_config


def get_config(variant: str = ""):
    """The ImageNet 64x64 config; `variant` is '' or 'smoke' (tiny model, few steps)."""
    c = base_config()
    c.data.name = "imagenet_resized/64x64"
    c.data.eval_split = "validation"
    c.model.kind = "unet"
    c.model.parameterisation = "both"
    c.model.channels = 192
    c.model.emb_dim = 768
    c.model.channel_mult = (1, 2, 3, 4)
    c.model.num_res_blocks = 3
    c.model.attn_resolutions = (8, 16, 32)
    c.model.num_heads = 4  # the source uses 64-channel heads; 4 heads = 48..192 channels here
    c.model.dropout = 0.1
    c.model.dtype = "bfloat16"
    c.guidance.w_min, c.guidance.w_max = 0.0, 4.0
    c.teacher.batch_size = 2048
    c.teacher.num_steps = 540_000
    c.teacher.optimizer = optimizer_config(
        learning_rate=3e-4, warmup_steps=1000, decay="constant", grad_clip=1.0, ema_decay=0.9999
    )
    c.stage1.batch_size = 2048
    c.stage1.num_steps = 50_000
    c.stage1.optimizer = optimizer_config(
        learning_rate=1e-4, warmup_steps=0, decay="linear", grad_clip=1.0, ema_decay=0.9999
    )
    c.stage2.batch_size = 2048
    c.stage2.n_start = 1024
    c.stage2.n_end = 1
    c.stage2.steps_per_round = 50_000
    c.stage2.final_rounds = 0
    c.stage2.optimizer = optimizer_config(
        learning_rate=1e-4, warmup_steps=0, decay="linear", grad_clip=1.0, ema_decay=0.0
    )
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.eval.num_samples = 50_000
    if variant == "smoke":
        c.model.channels = 16
        c.model.emb_dim = 0
        c.model.channel_mult = (1, 2)
        c.model.num_res_blocks = 1
        c.model.attn_resolutions = (16,)
        c.model.num_heads = 1
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
            f"configs/imagenet64.py variant {variant!r} is unknown: accepted '', 'smoke'."
        )
    return c
