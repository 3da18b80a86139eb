"""vlpt: distributed vision-and-language pretraining (UNITER / ALBEF) on DeepSpeed."""
from setuptools import find_packages, setup

LAYERS = ["kernels", "data", "trainer", "cluster", "vlpt"]

setup(
    name="vlpt",
    version="0.1.0",
    description="Distributed vision-and-language pretraining: UNITER and ALBEF on DeepSpeed ZeRO",
    python_requires=">=3.10",
    # The import packages are the top-level folders, as in UNITER's and ALBEF's repositories, with their
    # subpackages. Each imports only the ones before it: kernels <- data <- trainer <- cluster <- vlpt (the
    # command line); tests/unit/test_import_layers.py checks it.
    packages=find_packages(include=[*LAYERS, *(f"{p}.*" for p in LAYERS)]),
    package_data={"data": ["vocab/*.txt"], "cluster": ["templates/*"]},
    install_requires=[
        "torch>=2.11",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "tokenizers>=0.20",
        "safetensors",
        "webdataset>=0.2.90",
        "boto3",
        "pot>=0.9",
        "mlflow>=2.16",
        "triton; platform_system == 'Linux'",  # no wheels elsewhere: the ops fall back to torch
        "tqdm",
        "pyyaml",
        "numpy",
        "lmdb>=1.4",  # vlpt shards uniter-lmdb / lmdb-features (data/region_formats)
        "lz4>=4.0",
        "msgpack>=1.0",
    ],
    entry_points={"console_scripts": ["vlpt = vlpt.cli:entry"]},
)
