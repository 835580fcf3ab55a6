"""Install mmembed_jax: `pip install -e '.[test]'` for development, `.[torch]` for PyTorch export checks."""
from setuptools import find_packages, setup

TORCH = ["torch==2.13.0"]  # the CPU wheel; a looser pin pulls a multi-GB CUDA build
PEFT = ["peft==0.21.2"]  # loads exported adapters; the oracle models/adapters.py matches
# The video oracles: qwen-vl-utils samples frames; transformers' Qwen2VLVideoProcessor needs
# torchvision, which tests/torchvision_compat.py fetches for the test process alone.
VIDEO_ORACLES = ["qwen-vl-utils==0.0.14"]

setup(
    name="mmembed_jax",
    version="0.1.0",
    description="JAX/Flax multimodal embedding models (Qwen2-VL / Qwen2.5-VL) for TPU pods.",
    packages=find_packages(include=["mmembed_jax", "mmembed_jax.*"]),
    package_data={"mmembed_jax.evaluation": ["tables/*.json"],  # benchmark task tables
                  "mmembed_jax.convert": ["profiles.json"]},  # published evaluation protocols
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "ml-collections",
        "transformers>=5.0",
        "tokenizers",
        "sentencepiece",
        "safetensors",
        "numpy",
        "pillow",
        "av",  # PyAV: FFmpeg in the wheel, decodes and seeks videos
        "pyarrow",
        "absl-py",
        "etils[epath]",
        "tqdm",
        "tensorboardX",
    ],
    extras_require={
        "torch": TORCH + PEFT,
        "tpu": ["libtpu"],
        "tfds": ["tensorflow-datasets"],
        "mteb": TORCH + ["mteb"],  # evaluation/mteb_bridge.py (torch first: the CPU wheel)
        "test": TORCH + PEFT + VIDEO_ORACLES + [
            "pytest", "pytest-timeout", "pytest-xdist",
            "libtpu",  # TPU proofs on CPU
            "pytrec-eval-terrier",  # the retrieval scores' oracle
            "mteb",  # evaluation/mteb_bridge.py
        ],
    },
)
