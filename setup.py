"""Installs the megamod package and builds the megamod._C extension from csrc/.

The C++ (CPU) kernels are always built. The CUDA kernels (csrc/*.cu) are added only when the installed torch
has CUDA and nvcc is found, so a CPU machine never needs a CUDA toolchain to install megamod.
Build with `pip install --no-build-isolation -e .` so that the already installed (pinned) torch is used.
"""
import glob
import os
import re

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    cxx_flags = ["-O3", "-std=c++17"]
    with_cuda = (
        os.environ.get("MEGAMOD_NO_CUDA", "0") != "1"
        and cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
    )
    if with_cuda:
        return cpp_extension.CUDAExtension(
            "megamod._C",
            cpp_sources + cu_sources,
            define_macros=[("MEGAMOD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "megamod._C", cpp_sources, extra_compile_args=cxx_flags + ["-fopenmp"], extra_link_args=["-fopenmp"]
    )


def _megatron_core_range():
    """megamod/mcore_version.py's SUPPORTED, read rather than imported (megamod's imports need its dependencies)."""
    with open(os.path.join(HERE, "megamod", "mcore_version.py")) as f:
        return re.search(r'^SUPPORTED = "([^"]+)"', f.read(), re.M).group(1)


# Ranges, not requirements*.txt's pins (those are the two test environments `make test` builds): `pip install
# megamod` must leave a user's torch and megatron-core alone where megamod supports them. megatron-core: the series
# megamod is tested on (0.16 on Python 3.11, 0.19 on 3.12; 0.17 and 0.18 are not), the same range that
# megamod/mcore_version.py checks at start-up. torch: 2.11 ran the GPU tier, 2.13 the CPU suite.
INSTALL_REQUIRES = [
    "megatron-core" + _megatron_core_range(),
    "torch>=2.11",
    "numpy>=1.26",
    "psutil",  # megatron-core's dist-checkpoint writer needs it without declaring it
    "transformers>=5.0",
    "safetensors",
    "tokenizers",
    "sentencepiece",
    "tiktoken",
    "protobuf",
    "pillow",
    "pyarrow>=15",  # parquet data (RLAIF-V's shards): megamod/data/parquet.py
    "matplotlib",
    "pyyaml",
    "tqdm",
    "tensorboard",
]


setup(
    name="megamod",
    version="0.1.0",
    description="LLaVA-MoD distillation of vision-language models into small MoE students on Megatron-Core",
    packages=find_packages(include=["megamod", "megamod.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"gpu": ["transformer-engine[pytorch]"], "test": ["pytest"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["megamod=megamod.cli:main"]},
)
