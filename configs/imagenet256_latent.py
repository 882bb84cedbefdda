"""ImageNet 256x256 (TFDS imagenet2012, 1000 classes), class-conditional, in a KL latent space.

Meng et al. (2022) Sec. 5 distil the open-source LDM (Rombach et al. 2022) class-conditional
ImageNet model, fine-tuned to v-prediction; teacher: 512-step guided DDIM, w in [0, 14]. The
open CFG model is CompVis/latent-diffusion configs/latent-diffusion/cin256-v2.yaml (LDM-4: 1001
labels, 1000 = null), on a VQ-f4 64x64x3 latent. We train the teacher from scratch with that
U-Net (v-prediction) on the KL-f4 autoencoder of configs/autoencoder/autoencoder_kl_64x64x3.yaml
(same f and latent shape). Our autoencoder has no attention, no LPIPS and no GAN loss (LDM's
LPIPSWithDiscriminator): reconstruction (L1) + KL only. Teacher length and batch: LDM paper
(arXiv 2112.10752) App. table, cin LDM-4: 178k iterations at batch 1200. Distillation lengths:
Meng et al.'s LAION latent runs (batch 512; stage one 3,000 updates; stage two 2,000 updates per
halving, 20,000 for N = 1, 2, 4), applied here to ImageNet: our choice. TFDS imagenet2012
needs the ILSVRC2012 tars in its manual_dir (pip install -e .[tfds-prepare]).
"""

from distill_jax.config import base_config, optimizer_config


def get_config(variant: str = ""):
    """The latent ImageNet 256x256 config; `variant` is '' or 'smoke' (tiny model, few steps)."""
    c = base_config()
    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.eval_split = "validation"
    ae = c.autoencoder  # autoencoder_kl_64x64x3.yaml (KL-f4)
    ae.enabled = True
    ae.channels = 128  # ddconfig.ch
    ae.channel_mult = (1, 2, 4)  # ddconfig.ch_mult: f = 4, latent 64x64
    ae.num_res_blocks = 2  # ddconfig.num_res_blocks
    ae.latent_channels = 3  # z_channels = embed_dim = 3
    ae.kl_weight = 1e-6  # lossconfig.params.kl_weight
    ae.loss = "l1"  # LPIPSWithDiscriminator's pixel term is |x - x_rec|
    ae.dropout = 0.0  # ddconfig.dropout
    ae.batch_size = 24  # data.batch_size 12 x accumulate_grad_batches 2 (one GPU)
    ae.num_steps = 100_000  # our choice (LDM gives none; its GAN starts at step 50,001)
    # Adam betas (0.5, 0.9): ldm/models/autoencoder.py AutoencoderKL.configure_optimizers. lr:
    # base_learning_rate 4.5e-6 scaled by main.py --scale_lr (x 24 on one GPU) = 1.08e-4.
    ae.optimizer = optimizer_config(
        learning_rate=1.08e-4, warmup_steps=0, decay="constant", grad_clip=0.0, ema_decay=0.0
    )
    ae.optimizer.b1, ae.optimizer.b2 = 0.5, 0.9
    c.model.kind = "unet"  # cin256-v2.yaml unet_config, on the 64x64x3 latent
    c.model.parameterisation = "v"  # Meng et al. fine-tune LDM to v-prediction
    c.model.channels = 192  # model_channels
    c.model.emb_dim = 768  # openaimodel.py time_embed_dim = 4 * model_channels
    c.model.channel_mult = (1, 2, 3, 5)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (8, 16, 32)  # attention_resolutions [8, 4, 2] are ds of 64
    c.model.num_heads = 1  # num_heads: 1
    c.model.dropout = 0.0  # openaimodel.py UNetModel default; the yaml sets none
    c.model.dtype = "bfloat16"
    c.guidance.w_min, c.guidance.w_max = 0.0, 14.0  # Meng et al. Sec. 5 (latent ImageNet)
    c.teacher.batch_size = 1200
    c.teacher.num_steps = 178_000
    # ddpm.py LatentDiffusion.configure_optimizers: torch AdamW (weight decay 0.01 by default),
    # lr base_learning_rate 1e-4, no scheduler, use_ema: False. Clipping: our choice (LDM: none).
    c.teacher.optimizer = optimizer_config(
        learning_rate=1e-4, warmup_steps=0, decay="constant", weight_decay=0.01, ema_decay=0.0
    )
    c.stage1.batch_size = 512
    c.stage1.num_steps = 3000
    # Distillation optimisers: our choice, after diffusion_distillation's rounds (lr annealed
    # linearly to 0 per round, no EMA) at LDM's lr 1e-4.
    c.stage1.optimizer = optimizer_config(
        learning_rate=1e-4, warmup_steps=0, decay="linear", ema_decay=0.0
    )
    c.stage2.batch_size = 512
    c.stage2.n_start = 512  # the 512-step DDIM teacher
    c.stage2.n_end = 1
    c.stage2.steps_per_round = 2000
    c.stage2.final_rounds = 3  # N = 4, 2, 1
    c.stage2.final_steps_per_round = 20_000
    c.stage2.stochastic = False
    c.stage2.optimizer = optimizer_config(
        learning_rate=1e-4, warmup_steps=0, decay="linear", ema_decay=0.0
    )
    c.train.log_every = 100  # our choice
    c.train.checkpoint_every = 1000  # our choice
    c.eval.num_samples = 50_000  # the usual FID-50k
    c.eval.guidance_weights = (0.0, 1.0, 2.0, 4.0, 8.0, 14.0)  # our choice, spans [0, 14]
    if variant == "smoke":
        c.data.image_size = 16
        ae.channels = 8
        ae.channel_mult = (1, 2)  # f = 2: latent 8x8x4
        ae.num_res_blocks = 1
        ae.latent_channels = 4
        ae.batch_size = 8
        ae.num_steps = 4
        c.model.channels = 16
        c.model.emb_dim = 0
        c.model.channel_mult = (1,)  # one level: as configs/digits.py's smoke, for compile time
        c.model.num_res_blocks = 1
        c.model.attn_resolutions = (8,)
        c.model.num_heads = 1
        c.model.dtype = "float32"
        for stage in (c.teacher, c.stage1, c.stage2):
            stage.batch_size = 8
        c.teacher.num_steps = 4
        c.stage1.num_steps = 2
        c.stage2.n_start = 4
        c.stage2.steps_per_round = 2
        c.stage2.final_steps_per_round = 2
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.eval.num_samples = 16
    elif variant:
        raise ValueError(
            f"configs/imagenet256_latent.py variant {variant!r} is unknown: accepted '', 'smoke'."
        )
    return c
