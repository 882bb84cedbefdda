"""Packaging for distill_jax: guided diffusion distillation in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="distill_jax",
    version="0.1.0",
    description=(
        "Guided diffusion distillation (Meng et al. 2022) in JAX/Flax: "
        "teacher training, stage-one and progressive stage-two distillation."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["distill_jax", "distill_jax.*"]),
    package_data={"distill_jax": ["py.typed"]},
    install_requires=[
        "jax>=0.7,<0.13",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        "chex>=0.1.90,<0.2",
        "ml-collections>=1.0,<2",
        "tensorflow-datasets>=4.9.8,<5",
        "array-record>=0.7,<0.9",
        "grain>=0.2.10,<0.3",
        "absl-py>=2.1,<3",
        # etils.epath: workdir paths, local or gs:// (also an Orbax dependency)
        "etils[epath]>=1.7,<2",
        "numpy>=1.26,<3",
        "pillow>=10,<14",
        "matplotlib>=3.8,<4",
        "scikit-learn>=1.4,<2",
        "tensorboardX>=2.6,<3",
        "tqdm>=4.66,<5",
        # jax.export (de)serialization of the exported sampler (`distill-jax export`).
        "flatbuffers>=24.3",
        # The frozen text encoder of text runs (distill_jax/text_encoder.py): its tokenizer.json
        # and model.safetensors. The weights themselves come from requirements/weights.txt.
        "tokenizers>=0.20,<0.24",
        "safetensors>=0.4,<0.9",
        "scipy>=1.11,<2",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "ruff>=0.6,<1",
            # the layers contract of .importlinter (imports flow one way), run by scripts/test.sh
            "import-linter>=2.1,<3",
            # `distill-jax plan`: describes TPU slices so steps compile for them on a CPU;
            # the libtpu release that jax[tpu] pins for the pinned jax (0.10.2: 0.0.42.*).
            "libtpu==0.0.42.*",
            # executing launch/explore.ipynb in tests/test_notebook.py
            "nbclient>=0.10,<0.12",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
        ],
        # Preparing standard TFDS image datasets (cifar10, mnist, imagenet_resized)
        # from their original archives needs TensorFlow; the bundled digits do not.
        "tfds-prepare": ["tensorflow-cpu>=2.16"],
        # bench/torch_side_by_side.py: the same teacher step in PyTorch, for the JAX/torch ratio.
        "bench": ["torch==2.13.0"],
        # scripts/diffusers_golden.py and scripts/train_diffusers_dit.py: golden files and a
        # teacher made by diffusers itself (CI never installs these; tests read their files).
        "diffusers": [
            "torch==2.13.0",
            "diffusers==0.42.1",
            "transformers==5.25.0",
            "safetensors>=0.4,<0.9",
        ],
    },
    entry_points={"console_scripts": ["distill-jax=distill_jax.cli:run_main"]},
)
