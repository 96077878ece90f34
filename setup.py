"""Build and install hpc_rlhf.

The package is pure Python on the torch path. ``hpc_rlhf._C`` (C++ CPU kernels, plus CUDA
kernels when torch has CUDA) is built from ``csrc/`` when torch is importable at build time;
set ``HPC_RLHF_NO_EXT=1`` to skip it, ``HPC_RLHF_CUDA_ARCHS=90`` (comma-separated) to build
the CUDA kernels for those GPU architectures only (default 80,90: A100 and H100). Every package under ``hpc_rlhf/`` is installed
(``find_packages``: a listed set missed ``hpc_rlhf.models.overrides``).
"""

import glob
import os

from setuptools import find_packages, setup


def _gencode_flags() -> list[str]:
    """nvcc targets: ``HPC_RLHF_CUDA_ARCHS`` (e.g. ``90`` or ``80,90``), A100 and H100 unless set."""
    archs = os.environ.get("HPC_RLHF_CUDA_ARCHS", "80,90").split(",")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]


def _extensions():
    """Return (ext_modules, cmdclass) for hpc_rlhf._C, or empty when not buildable."""
    if os.environ.get("HPC_RLHF_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources:
        return [], {}
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "hpc_rlhf._C",
            cpp_sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("HPC_RLHF_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", *_gencode_flags()],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "hpc_rlhf._C",
            cpp_sources,
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


EXT_MODULES, CMDCLASS = _extensions()

setup(
    name="hpc_rlhf",
    version="0.1.0",
    description="RLHF training engine on megatron-core with fused kernels and colocated generation",
    python_requires=">=3.10",
    packages=find_packages(include=["hpc_rlhf", "hpc_rlhf.*"]),
    package_data={"hpc_rlhf": ["assets/*"]},
    install_requires=[
        "torch>=2.13",
        "megatron-core>=0.16",
        "triton>=3.2; platform_system=='Linux'",
        "sentencepiece",
        "tokenizers",  # tokenizer.json files (data/tokenizer.py)
        "safetensors",
        "pyyaml",
        "numpy",
        "tqdm",
        "datasets>=3",  # Parquet / Arrow data files (data/sources.py)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "transformers>=4.45",
            "ruff",
            "mypy",
            "tensorboard",
            "wandb",
            "mlflow-skinny",
        ],
        "trackers": ["wandb", "mlflow-skinny"],  # tracking.backends (utils/trackers.py)
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={"console_scripts": ["hpc-rlhf=hpc_rlhf.cli:main"]},
)
