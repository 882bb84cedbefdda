"""Read a Stable-Diffusion-family pipeline folder: U-Net, text encoder, tokenizer, VAE, schedule.

A folder as `StableDiffusionPipeline.save_pretrained` writes it (SD 1.x, SD 2.x and their
fine-tunes):
- `unet/`: UNet2DConditionModel (`interop.unet`);
- `text_encoder/` + `tokenizer/`: CLIPTextModel with its BPE tokenizer, or a BERT-family
  encoder (`interop.text_encoder`);
- `vae/`: AutoencoderKL (`interop.vae`); a folder without one (and without a 'vae' entry in
  model_index.json) is a pixel-space pipeline;
- `scheduler/`: a discrete DDPM-family schedule (`interop.scheduler`).
A part model_index.json names, or any of unet/scheduler/text_encoder/tokenizer, that is
missing is refused in one line. So are parts that do not fit each other: a VAE whose latent
channels are not the U-Net's input channels, a text encoder whose width is not the U-Net's
cross_attention_dim, a tokenizer with more tokens than the encoder's vocabulary. Safety
checkers and feature extractors are not needed for distillation and are not read.

Conventions recorded (`ImportedTeacher.record`): guidance_scale s = 1 + w; the unconditional
input is the empty prompt's encoding (a negative prompt's, where one is given); the prompt's
encoding is encode_prompt's (padded to the tokenizer's model_max_length, all positions
attended by the U-Net).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os

import jax
from etils import epath

from distill_jax.interop import sd3_pipeline
from distill_jax.interop import text_encoder as text_reader
from distill_jax.interop import unet as unet_reader
from distill_jax.interop import vae as vae_reader
from distill_jax.interop.core import (
    FolderError,
    ImportedTeacher,
    existing_folder,
    integer,
    model_config,
    pipeline_parts,
    read_json,
    text_to_image_teacher,
)
from distill_jax.interop.dit import read_dit_folder, read_dit_weights
from distill_jax.interop.scheduler import read_schedule
from distill_jax.models import denoiser

REQUIRED = ("unet", "scheduler", "text_encoder", "tokenizer")
TEXT_ENCODER_FILES = ("config.json", "model.safetensors")
SHARDS_INDEX = "model.safetensors.index.json"
# What a run reads of a folder after its import, by part: names or fnmatch patterns (None:
# every file of the part). The
# network's and the VAE's weights are not among them: the import converts them into the
# workdir's checkpoints.
KEPT = {
    "": ("model_index.json",),
    "scheduler": ("scheduler_config.json",),
    "unet": ("config.json",),
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": TEXT_ENCODER_FILES,
    "tokenizer": None,
    # An SD3 pipeline's second CLIP and its T5 (whose weights may be sharded).
    "text_encoder_2": TEXT_ENCODER_FILES,
    "tokenizer_2": None,
    "text_encoder_3": TEXT_ENCODER_FILES + (SHARDS_INDEX, "model-*.safetensors"),
    "tokenizer_3": None,
}


def text_encoder(
    folder: str, clip_skip: int | None = None, max_tokens: int = 0, dtype: str = "float32"
):
    """The pipeline's prompt encoder (tokenizer + text encoder); refusals are FolderErrors.

    An SD3 pipeline's (`sd3_pipeline.text_encoder`) pads to `max_tokens` (config.text's).
    `dtype` is its weights' (config.train.frozen_dtype).
    """
    if sd3_pipeline.is_sd3_folder(folder):
        return sd3_pipeline.text_encoder(folder, clip_skip, max_tokens, dtype)
    return text_reader.PipelineTextEncoder(
        os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer"), clip_skip, dtype
    )


def _check_text(folder: str, text: dict, cross_attention_dim: int) -> None:
    if text["width"] != cross_attention_dim:
        raise FolderError(
            f"{folder}: the text encoder's states are {text['width']} wide but the U-Net's "
            f"cross_attention_dim is {cross_attention_dim}: the parts are not from one pipeline"
        )


def _text_record(folder: str) -> dict:
    """Width, length and kind of the text encoder, from its configs (no weights read)."""
    cfg = read_json(os.path.join(folder, "text_encoder", "config.json"), "the text encoder config")
    kind, sizes = text_reader.encoder_sizes(
        cfg, os.path.join(folder, "text_encoder", "config.json")
    )
    _, max_tokens, _ = text_reader.load_tokenizer(os.path.join(folder, "tokenizer"))
    return dict(kind=kind, width=int(sizes.width), max_tokens=int(max_tokens), vocab=sizes.vocab)


def read_sd_folder(
    folder: str, *, weights: bool = True, configs_only: bool = False
) -> ImportedTeacher:
    """Read a text-to-image pipeline folder into an SDUNet teacher (see the module docstring).

    With weights=False only configs and checksums are read (params None; `read_sd_weights`);
    configs_only reads the JSON files alone (no checksums: a plan before the download).
    `data_shape` is what the U-Net takes: latents for a pipeline with a VAE.

    Raises:
      FolderError: the first thing that is missing, unsupported or mismatched, in one line.
    """
    folder = existing_folder(folder)
    parts = pipeline_parts(folder, REQUIRED, ("vae",), "StableDiffusionPipeline")
    model, unet_cfg = unet_reader.read_unet_config(os.path.join(folder, "unet"))
    schedule_keys, schedule_record = read_schedule(folder)
    model.update(schedule_keys)
    text = _text_record(folder)
    _check_text(folder, text, model["sd_unet"]["cross_attention_dim"])
    vae = vae_reader.read_vae_entry(folder, int(unet_cfg["in_channels"]), configs_only=configs_only)
    where = os.path.join(folder, "unet", "config.json")
    size, channels = (
        integer(unet_cfg, "sample_size", where),
        integer(unet_cfg, "in_channels", where),
    )
    if not configs_only:
        unet_reader.check_unet_sizes(model, os.path.join(folder, "unet"))
    imported = text_to_image_teacher(
        folder,
        "unet",
        model=model,
        schedule_record=schedule_record,
        data_shape=(size, size, channels),
        configs_only=configs_only,
        parts=list(parts),
        unet_class=unet_reader.UNET_CLASS,
        text=text,
        vae=vae,
        conventions=dict(
            guidance="diffusers guidance_scale s = 1 + w",
            unconditional="the empty prompt's encoding (a negative prompt's where given)",
            prompt_encoding=(
                f"padded to {text['max_tokens']} tokens, last hidden state, every position attended"
            ),
        ),
    )
    if not weights or configs_only:
        return imported
    return dataclasses.replace(imported, params=read_sd_weights(imported))


def sd_model(imported: ImportedTeacher, *, use_guidance: bool = False):
    """An imported text-to-image network (SD U-Net or SD3 MMDiT) on its trained range.

    A student's (with its guidance branch) with use_guidance.
    """
    lo, hi = imported.logsnr_range
    return denoiser.build_model(
        model_config(imported.model),
        data_shape=imported.data_shape,
        num_classes=0,
        use_guidance=use_guidance,
        text_dim=imported.record["text"]["width"],
        logsnr_min=lo,
        logsnr_max=hi,
    )


def abstract_sd_params(imported: ImportedTeacher):
    """Shapes of the SDUNet's parameters for an import (jax.eval_shape, no weights)."""
    model = sd_model(imported)
    return jax.eval_shape(
        lambda: denoiser.init_params(model, jax.random.PRNGKey(0), data_shape=imported.data_shape)
    )


def read_sd_weights(imported: ImportedTeacher):
    """The imported pipeline's U-Net weights as SDUNet params (numpy float32)."""
    unet_dir = os.path.join(imported.record["source"], "unet")
    return unet_reader.load(abstract_sd_params(imported), unet_dir)


def is_pipeline_folder(folder: str) -> bool:
    """Whether `folder` is a text-to-image pipeline (it has unet/), not a DiT one."""
    return os.path.isdir(os.path.join(os.fspath(folder), "unet"))


def _check_links(folder: str) -> None:
    """Refuse a link in the folder or its parts that leads nowhere (a loop, a missing target)."""
    if not os.path.isdir(folder):
        return
    parts = [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
    for part in [folder] + [p for p in parts if os.path.isdir(p)]:
        for name in sorted(os.listdir(part)):
            path = os.path.join(part, name)
            if os.path.islink(path) and not os.path.exists(path):
                raise FolderError(
                    f"{path} is a link that leads nowhere (a loop, or a target that is missing): "
                    "accepted files and folders, or links to existing ones"
                )


def read_teacher_folder(
    folder: str, *, weights: bool = True, configs_only: bool = False
) -> ImportedTeacher:
    """Any teacher folder distill_jax reads: a text-to-image pipeline or a DiT pipeline.

    Either may hold a vae/ (a latent model): its record is the 'vae' entry (None without).
    configs_only reads the JSON files alone (see `read_sd_folder`, `read_dit_folder`).
    """
    _check_links(folder)
    if sd3_pipeline.is_sd3_folder(folder):
        return sd3_pipeline.read_sd3_folder(folder, weights=weights, configs_only=configs_only)
    if is_pipeline_folder(folder):
        return read_sd_folder(folder, weights=weights, configs_only=configs_only)
    if os.path.isdir(folder) and not os.path.isdir(os.path.join(folder, "transformer")):
        raise FolderError(
            f"{os.path.abspath(folder)} is not a diffusers pipeline folder distill_jax reads: "
            "it has neither unet/ (a text-to-image pipeline: unet/, text_encoder/, tokenizer/, "
            "scheduler/, vae/) nor transformer/ (a DiT pipeline: transformer/, scheduler/)"
        )
    imported = read_dit_folder(folder, weights=weights, configs_only=configs_only)
    channels = imported.data_shape[-1]
    vae = vae_reader.read_vae_entry(os.path.abspath(folder), channels, "transformer", configs_only)
    return dataclasses.replace(imported, record=dict(imported.record, vae=vae))


def read_teacher_weights(imported: ImportedTeacher):
    """The network weights of a folder read with weights=False."""
    if imported.record.get("pipeline") == sd3_pipeline.PIPELINE_CLASS:
        return sd3_pipeline.read_sd3_weights(imported)
    if imported.record.get("kind") == "text_to_image":
        return read_sd_weights(imported)
    return read_dit_weights(imported)


def copy_kept_files(folder: str, destination: epath.PathLike) -> None:
    """Copy into `destination` the files of `folder` a run reads after the import (`KEPT`).

    Links are followed (their targets are copied). The copy is written beside `destination`
    and renamed when whole, so an interrupted copy is never taken for one; a leftover partial
    copy is replaced.
    """
    destination = epath.Path(destination)
    partial = destination.parent / f"{destination.name}.partial"
    if partial.exists():
        partial.rmtree()
    for part, names in KEPT.items():
        source = os.path.join(folder, part)
        if not os.path.isdir(source):
            continue
        files = sorted(n for n in os.listdir(source) if os.path.isfile(os.path.join(source, n)))
        if names is not None:  # file names or patterns (a sharded encoder's shards)
            files = [n for n in files if any(fnmatch.fnmatchcase(n, p) for p in names)]
        for name in files:
            path = os.path.join(source, name)
            if os.path.isfile(path):
                (partial / part).mkdir(parents=True, exist_ok=True)
                epath.Path(os.path.realpath(path)).copy(partial / part / name)
    partial.rename(destination)
