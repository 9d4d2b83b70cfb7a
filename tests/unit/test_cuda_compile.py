"""csrc/permute_cuda.cu compiles with nvcc, so CUDA builds are checked on machines without a GPU."""
import shutil
import subprocess
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "permute_cuda.cu"
# The macros torch's CUDAExtension adds: they remove the implicit half / bfloat16 conversions the kernels must not use.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_permute_cuda_compiles(tmp_path):
    command = [NVCC, "-c", "-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90", *TORCH_NVCC_FLAGS,
               str(SOURCE), "-o", str(tmp_path / "permute_cuda.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), result.stderr
