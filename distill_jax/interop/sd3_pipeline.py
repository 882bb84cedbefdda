"""Read a Stable Diffusion 3 / 3.5 pipeline folder: MMDiT, three text encoders, VAE, flow schedule.

A folder as `StableDiffusion3Pipeline.save_pretrained` writes it:
- `transformer/`: SD3Transformer2DModel (`interop.sd3`, `models.mmdit.MMDiT`);
- `text_encoder/` + `tokenizer/`, `text_encoder_2/` + `tokenizer_2/` (the two CLIPs with
  projection) and, optionally, `text_encoder_3/` + `tokenizer_3/` (T5) (`interop.sd3_text`);
  without T5 its states are zeros, as the pipeline loaded with text_encoder_3=None computes;
- `vae/`: AutoencoderKL with SD3's latent shift and scale (`interop.vae`); without one the
  pipeline is taken as pixel-space (a digits-scale teacher);
- `scheduler/`: FlowMatchEulerDiscreteScheduler (`interop.scheduler`, `diffusion.flow`).
Missing or mismatched parts are refused in one line: a text side whose widths are not the
transformer's joint_attention_dim and pooled_projection_dim, a VAE whose latent channels are not
its in_channels.

Conventions recorded (`ImportedTeacher.record`): guidance_scale s = 1 + w (the pipeline guides
the velocity, which is affine in x-hat); the unconditional input is the empty prompt's encoding
(StableDiffusion3Pipeline's default negative prompt ""); the prompt's condition is
encode_prompt's (prompt_embeds, pooled) packed into one array (`models.mmdit.pack_condition`),
T5 padded to the run's config.text.max_sequence_length tokens.
"""

from __future__ import annotations

import dataclasses
import os

from distill_jax.interop import sd3
from distill_jax.interop import sd3_text as text_reader
from distill_jax.interop import vae as vae_reader
from distill_jax.interop.core import (
    FolderError,
    ImportedTeacher,
    check_layer_count,
    existing_folder,
    integer,
    pipeline_parts,
    read_json,
    read_safetensors_shapes,
    text_to_image_teacher,
)
from distill_jax.interop.scheduler import read_schedule
from distill_jax.models.kinds import MMDIT_SIZES
from distill_jax.models.mmdit import condition_width

PIPELINE_CLASS = "StableDiffusion3Pipeline"
REQUIRED = (
    "transformer",
    "scheduler",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
)
OPTIONAL = ("text_encoder_3", "tokenizer_3", "vae")
DEFAULT_T5_TOKENS = 256  # encode_prompt's max_sequence_length


def is_sd3_folder(folder: str) -> bool:
    """Whether `folder` holds an SD3 pipeline (its transformer/ is an SD3Transformer2DModel)."""
    where = os.path.join(os.fspath(folder), "transformer", "config.json")
    if not os.path.isfile(where):
        return False
    try:
        return read_json(where, "the transformer config").get("_class_name") == sd3.CLASS_NAME
    except FolderError:
        return False


def _parts(folder: str) -> tuple[str, ...]:
    """The parts the folder has; refuses a named or required one that is missing.

    Also refused: a part model_index.json names that this reader cannot read, half of T5.
    """
    t5 = [os.path.isdir(os.path.join(folder, p)) for p in ("text_encoder_3", "tokenizer_3")]
    if t5[0] != t5[1]:
        raise FolderError(
            f"{folder} has {'text_encoder_3' if t5[0] else 'tokenizer_3'}/ without "
            f"{'tokenizer_3' if t5[0] else 'text_encoder_3'}/: accepted both (T5) or neither"
        )
    return pipeline_parts(folder, REQUIRED, OPTIONAL, PIPELINE_CLASS)


def _clip_tokens(folder: str) -> int:
    """CLIP's tokens per prompt: tokenizer/'s model_max_length (no vocabulary read)."""
    where = os.path.join(folder, "tokenizer", "tokenizer_config.json")
    config = read_json(where, "the CLIP tokenizer config")
    return integer(config, "model_max_length", where, low=2)


def text_record(folder: str, fields: dict) -> dict:
    """The text side's record from its configs (no weights read); checks it fits `fields`."""
    pooled, joint = 0, int(fields["joint_attention_dim"])
    for part in ("text_encoder", "text_encoder_2"):
        where = os.path.join(folder, part, "config.json")
        config = read_json(where, "a CLIP text encoder config")
        pooled += text_reader.clip_part(config, where).projection
    t5 = os.path.isdir(os.path.join(folder, "text_encoder_3"))
    if t5:
        where = os.path.join(folder, "text_encoder_3", "config.json")
        sizes = text_reader.t5_sizes(read_json(where, "the T5 encoder config"), where)
        joint = int(sizes.width)
    where = os.path.join(folder, "transformer", "config.json")
    for key, width, source in (
        ("joint_attention_dim", joint, "T5's d_model"),
        ("pooled_projection_dim", pooled, "the CLIP encoders' projection_dim sum"),
    ):
        if int(fields[key]) != width:
            raise FolderError(
                f"{where} has {key}={fields[key]} but {source} is {width}: the text encoders "
                "are not this transformer's"
            )
    clip_tokens = _clip_tokens(folder)
    return dict(
        kind="sd3",
        width=condition_width(joint, pooled),
        clip_tokens=int(clip_tokens),
        t5=t5,
        max_tokens=int(clip_tokens) + DEFAULT_T5_TOKENS + 1,  # a run's: its max_sequence_length
    )


def model_keys(fields: dict) -> dict:
    """config.model keys of `interop.sd3.transformer_config`'s fields (kind 'mmdit')."""
    mmdit = {key: int(fields[key]) for key in MMDIT_SIZES}
    mmdit["dual_attention_layers"] = list(fields["dual_attention_layers"])
    mmdit["qk_norm"] = fields["qk_norm"] or ""
    return dict(kind="mmdit", mmdit=mmdit)


def read_sd3_folder(
    folder: str, *, weights: bool = True, configs_only: bool = False
) -> ImportedTeacher:
    """Read an SD3 pipeline folder into an MMDiT teacher (see the module docstring).

    weights=False and configs_only as `interop.pipeline.read_sd_folder` takes them.

    Raises:
      FolderError: the first thing that is missing, unsupported or mismatched, in one line.
    """
    folder = existing_folder(folder)
    parts = _parts(folder)
    where = os.path.join(folder, "transformer", "config.json")
    fields = sd3.transformer_config(read_json(where, "the transformer config"), where)
    if fields["out_channels"] != fields["in_channels"]:
        raise FolderError(
            f"{where} has out_channels={fields['out_channels']}: accepted in_channels "
            f"({fields['in_channels']}), a prediction of the latent's channels"
        )
    model = model_keys(fields)
    schedule_keys, schedule_record = read_schedule(folder)
    model.update(schedule_keys)
    text = text_record(folder, fields)
    channels = int(fields["in_channels"])
    vae = vae_reader.read_vae_entry(folder, channels, "transformer", configs_only)
    transformer_dir = os.path.join(folder, "transformer")
    if not configs_only:
        shapes = read_safetensors_shapes(transformer_dir)
        check_layer_count(shapes, "transformer_blocks.", fields["num_layers"], "num_layers", where)
    size = int(fields["sample_size"])
    imported = text_to_image_teacher(
        folder,
        "transformer",
        model=model,
        schedule_record=schedule_record,
        data_shape=(size, size, channels),
        configs_only=configs_only,
        pipeline=PIPELINE_CLASS,
        parts=list(parts),
        transformer_class=sd3.CLASS_NAME,
        text=text,
        vae=vae,
        conventions=dict(
            guidance="diffusers guidance_scale s = 1 + w (on the velocity)",
            unconditional="the empty prompt's encoding (a negative prompt's where given)",
            prompt_encoding=(
                "encode_prompt's prompt_embeds (CLIP-L and CLIP-G penultimate states, then T5's "
                "or zeros) and pooled_prompt_embeds, packed as one array (pooled last)"
            ),
        ),
    )
    if not weights or configs_only:
        return imported
    return dataclasses.replace(imported, params=read_sd3_weights(imported))


def read_sd3_weights(imported: ImportedTeacher):
    """The imported pipeline's transformer weights as MMDiT teacher params (numpy float32)."""
    transformer_dir = os.path.join(imported.record["source"], "transformer")
    where = os.path.join(transformer_dir, "config.json")
    fields = sd3.transformer_config(read_json(where, "the transformer config"), where)
    return sd3.load(sd3.teacher_params_shape(sd3.mmdit_module(fields)), transformer_dir)


def text_encoder(
    folder: str, clip_skip: int | None, max_tokens: int, dtype: str = "float32"
) -> text_reader.SD3TextEncoder:
    """The pipeline's prompt encoder, T5 padded to what `max_tokens` leaves after CLIP's."""
    clip_tokens = _clip_tokens(folder)
    t5_tokens = int(max_tokens) - int(clip_tokens) - 1
    if t5_tokens < 1:
        raise ValueError(
            f"config.text.max_tokens={max_tokens} leaves no T5 tokens after CLIP's "
            f"{clip_tokens} and the pooled row: accepted at least {clip_tokens + 2}."
        )
    return text_reader.SD3TextEncoder(
        folder, max_sequence_length=t5_tokens, clip_skip=clip_skip, dtype=dtype
    )
