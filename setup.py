"""phi4-megatron: pre-training, context extension and post-training of a Phi-4-class model on
Megatron-Core. Tested versions are pinned in requirements/tested.txt; the ranges here are what
the code is written against."""

from setuptools import find_packages, setup

setup(
    name="phi4-megatron",
    version="0.1.0",
    description="Phi-4-class training stack on Megatron-Core, Transformer Engine and Hydra",
    # conf/ stays at the top of the checkout and installs as the package phi4.conf (its YAML as
    # package data): the entry points find it through the installed package, wheel or editable.
    package_dir={"": "src", "phi4.conf": "conf"},
    packages=find_packages("src") + ["phi4.conf"],
    package_data={"phi4.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.6,<2.15",
        "megatron-core>=0.19,<0.20",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
        "numpy>=1.26",
        "psutil>=5.9",  # dist_checkpointing's writer needs it
        "safetensors>=0.4",
        "bpe-openai>=0.1",
        "tiktoken>=0.8",
        "tensorboard>=2.14",
        "hydra-submitit-launcher>=1.2,<1.3",  # hydra/launcher=slurm sweeps
        "pyyaml>=6",
        "tqdm>=4.60",  # phi4-convert's and phi4-data's progress
        "transformers>=4.50,<6",  # phi4-convert mcore-to-hf exports the tokenizer (and --verify's reference)
        "matplotlib>=3.8",  # phi4-report's pictures
        "pyarrow>=14",  # phi4-data preprocess: Parquet, Arrow and Hugging Face dataset directories
        "zstandard>=0.22",  # phi4-data preprocess: .jsonl.zst
    ],
    extras_require={
        # Experiment trackers (tracking.wandb, tracking.mlflow); the suite tests both for real.
        "tracking": ["wandb>=0.19", "mlflow-skinny>=2.16"],
        # lm-evaluation-harness with the phi4 model (phi4-lm-eval, phi4.eval.harness).
        "harness": ["lm-eval>=0.4.13,<0.5"],
        # The suite tests the trackers and the harness for real (its reference is lm-eval's `hf` model).
        "test": ["pytest>=8", "pytest-xdist>=3", "wandb>=0.19", "mlflow-skinny>=2.16", "lm-eval[hf]>=0.4.13,<0.5"],
        # On CUDA machines: Transformer Engine for the te spec and FP8 (built against the local torch).
        "gpu": ["transformer-engine[pytorch]>=2.4"],
    },
    entry_points={
        "console_scripts": [
            "phi4-train = phi4.cli.train:main",
            "phi4-convert = phi4.cli.convert:main",
            "phi4-data = phi4.cli.data:main",
            "phi4-plan = phi4.cli.plan:main",
            "phi4-pts = phi4.cli.pts:main",
            "phi4-eval = phi4.cli.eval:main",
            "phi4-report = phi4.cli.report:main",
            "phi4-lm-eval = phi4.cli.harness:main",
        ]
    },
)
