"""The configuration schema shared by every config file under configs/.

`base_config()` returns an `ml_collections.ConfigDict` holding every key the library reads,
with defaults; files under configs/ start from it and change what their dataset needs.
`validate_config` checks the values a run depends on and fails with a message naming the key
and what is accepted.
"""

from __future__ import annotations

import ml_collections

from distill_jax.diffusion.parameterisation import PARAMETERISATIONS
from distill_jax.diffusion.weighting import WEIGHTINGS

MODEL_KINDS = ("unet", "mlp")
TEACHER_KINDS = ("trained", "exact_gmm")
DTYPES = ("float32", "bfloat16", "float16")


def optimizer_config(
    *,
    learning_rate: float,
    warmup_steps: int,
    decay: str = "cosine",
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
) -> ml_collections.ConfigDict:
    """AdamW with linear warmup then `decay` ('cosine' or 'constant'), clipping and EMA."""
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


def base_config() -> ml_collections.ConfigDict:
    """Every key the library reads, with defaults suited to the bundled digits dataset."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # 'digits' (bundled), 'gmm' (toy), or any TFDS image dataset name
    c.data.data_dir = ""  # TFDS data_dir; '' means the library default (~/tensorflow_datasets)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_size = 0  # 0 keeps the dataset's own size; otherwise resize to this square
    c.data.worker_count = 0  # grain worker processes; 0 reads in the main process
    # Gaussian-mixture toy data (data.name == 'gmm'): class = component.
    c.data.gmm = ml_collections.ConfigDict(
        dict(num_classes=4, dim=2, num_examples=8192, radius=1.0, std=0.15, seed=0)
    )

    c.model = ml_collections.ConfigDict()
    c.model.kind = "unet"
    c.model.parameterisation = "v"
    c.model.dtype = "float32"  # compute dtype; parameters stay float32
    c.model.channels = 64
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (4,)
    c.model.num_heads = 4
    c.model.dropout = 0.1
    c.model.emb_dim = 0  # 0 means 4 * channels
    c.model.mlp_hidden = 256  # model.kind == 'mlp'
    c.model.mlp_depth = 4
    c.model.guidance_fourier_dim = 32  # Fourier features of w in the student's guidance branch

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.logsnr_min = -20.0
    c.diffusion.logsnr_max = 20.0
    c.diffusion.loss_weighting = "truncated_snr"
    c.diffusion.p_uncond = 0.1

    c.guidance = ml_collections.ConfigDict()
    c.guidance.w_min = 0.0
    c.guidance.w_max = 4.0

    c.teacher = ml_collections.ConfigDict()
    # 'trained': a network trained by `distill-jax train`; 'exact_gmm': the exact denoiser of
    # the Gaussian-mixture data (data.name == 'gmm'), a teacher with zero error.
    c.teacher.kind = "trained"
    c.teacher.batch_size = 128
    c.teacher.num_steps = 4000
    c.teacher.optimizer = optimizer_config(learning_rate=2e-3, warmup_steps=200)

    c.stage1 = ml_collections.ConfigDict()
    c.stage1.batch_size = 128
    c.stage1.dropout = 0.0  # distilled students train without dropout (diffusion_distillation)
    c.stage1.num_steps = 1000
    # EMA 0.99, not 0.999: the EMA starts at the stage's initial weights and is not debiased, so
    # after a few hundred steps a 0.999 EMA is still mostly those weights (0.999^300 = 0.74);
    # the next round's teacher would be the previous one. Long runs set their own (cifar10.py).
    c.stage1.optimizer = optimizer_config(learning_rate=5e-4, warmup_steps=100, ema_decay=0.99)

    c.stage2 = ml_collections.ConfigDict()
    c.stage2.batch_size = 128
    c.stage2.dropout = 0.0
    c.stage2.n_start = 256
    c.stage2.n_end = 1
    c.stage2.steps_per_round = 500
    c.stage2.final_rounds = 3  # the last `final_rounds` rounds train `final_steps_per_round`
    c.stage2.final_steps_per_round = 1000
    c.stage2.stochastic = False  # train jumps of 2/N (last 1/N) for the stochastic sampler
    c.stage2.optimizer = optimizer_config(learning_rate=5e-4, warmup_steps=50, ema_decay=0.99)

    c.train = ml_collections.ConfigDict()
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.mesh_data_axis = -1  # devices on the 'data' axis; -1 means all of them
    # Devices on the 'fsdp' axis: params, EMA and optimiser state are split over it (FSDP);
    # 1 is pure data parallelism. mesh_data_axis * mesh_fsdp_axis devices are used.
    c.train.mesh_fsdp_axis = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 500  # generated samples per (sampler, steps, w, seed)
    c.eval.guidance_weights = (0.0, 0.3, 1.0, 2.0, 4.0)
    c.eval.seeds = 2  # independent sample sets; tables report mean and spread over them
    c.eval.batch_size = 250  # samples per sampler call
    c.eval.teacher_steps = ()  # guided-DDIM teacher step counts; () = 1, 2, 4, ..., n_start
    c.eval.student_steps = ()  # student step counts to evaluate; () = every finished one
    c.eval.grid_rows = 8  # rows of a sample grid (one column per class)
    c.eval.reference_split = ""  # real data the FD compares with; '' = data.train_split
    # The feature classifier (FD / IS / accuracy), trained once per dataset and cached.
    c.eval.classifier = ml_collections.ConfigDict(
        dict(
            num_steps=1500,
            batch_size=128,
            learning_rate=2e-3,
            weight_decay=1e-4,
            features=64,  # width of the penultimate layer (the FD features)
            seed=0,
            cache_dir="",  # '' = $DISTILL_JAX_CACHE or ~/.cache/distill_jax
        )
    )
    return c


def _fail(key: str, value, accepted: str) -> None:
    raise ValueError(f"config.{key}={value!r} is invalid: accepted {accepted}.")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check the values a run depends on; raise ValueError naming the key and what is accepted."""
    m = config.model
    if m.kind not in MODEL_KINDS:
        _fail("model.kind", m.kind, f"one of {MODEL_KINDS}")
    if m.parameterisation not in PARAMETERISATIONS:
        _fail("model.parameterisation", m.parameterisation, f"one of {PARAMETERISATIONS}")
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, f"one of {DTYPES}")
    if config.diffusion.loss_weighting not in WEIGHTINGS:
        _fail("diffusion.loss_weighting", config.diffusion.loss_weighting, f"one of {WEIGHTINGS}")
    if not 0.0 <= config.diffusion.p_uncond < 1.0:
        _fail("diffusion.p_uncond", config.diffusion.p_uncond, "a probability in [0, 1)")
    if not config.diffusion.logsnr_min < config.diffusion.logsnr_max:
        _fail("diffusion.logsnr_min", config.diffusion.logsnr_min, "a value below logsnr_max")
    if not config.guidance.w_min <= config.guidance.w_max:
        _fail("guidance", (config.guidance.w_min, config.guidance.w_max), "w_min <= w_max")
    if config.guidance.w_min < -1.0:
        _fail("guidance.w_min", config.guidance.w_min, "a weight >= -1 (w = -1 is unconditional)")
    if config.teacher.kind not in TEACHER_KINDS:
        _fail("teacher.kind", config.teacher.kind, f"one of {TEACHER_KINDS}")
    if config.teacher.kind == "exact_gmm" and config.data.name != "gmm":
        _fail("teacher.kind", "exact_gmm", "'exact_gmm' only with data.name='gmm'")
    for stage in ("teacher", "stage1", "stage2"):
        if config[stage].batch_size < 1:
            _fail(f"{stage}.batch_size", config[stage].batch_size, "a positive integer")
        if config[stage].optimizer.learning_rate <= 0:
            _fail(
                f"{stage}.optimizer.learning_rate",
                config[stage].optimizer.learning_rate,
                "a positive number",
            )
    if config.train.mesh_fsdp_axis < 1:
        _fail("train.mesh_fsdp_axis", config.train.mesh_fsdp_axis, "an integer >= 1")
    n_start, n_end = config.stage2.n_start, config.stage2.n_end
    if (
        n_end < 1
        or n_start < n_end
        or n_start % n_end
        or ((n_start // n_end) & (n_start // n_end - 1))
    ):
        _fail(
            "stage2.n_start", (n_start, n_end), "n_start = n_end * 2**k with n_end >= 1 and k >= 0"
        )


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
