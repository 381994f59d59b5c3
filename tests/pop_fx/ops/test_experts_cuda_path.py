"""Which kernel ``pop::grouped_gemv`` runs on CUDA (``experts_decode.cuda_gemv_path``): never the gather + bmm that
copies every pair's expert block when torch's grouped GEMM or the Triton pair kernel can read the blocks in place.
(The CPU keeps its own rule, ``_grouped_mm_ok``, unchanged; the pair kernel's numbers are checked under the
interpreter in test_triton_interpret.py, its offsets too.)"""

import pytest
import torch

from pop_fx.ops.experts_decode import cuda_gemv_path


@pytest.mark.parametrize("kernels,dtype,cap,aligned,has_triton,want", [
    (0, torch.bfloat16, (9, 0), True, True, "grouped_mm"),   # the default on an H100/H200: torch's CUTLASS kernel
    (0, torch.bfloat16, (9, 0), False, True, "triton"),      # unaligned strides: torch would refuse
    (0, torch.float32, (9, 0), True, True, "triton"),        # torch's CUDA grouped GEMM is bf16 only
    (0, torch.float16, (9, 0), True, True, "triton"),
    (0, torch.bfloat16, (8, 0), True, True, "triton"),       # elsewhere torch loops over matmuls
    (1, torch.bfloat16, (9, 0), True, True, "triton"),       # kernels="triton" asks for the pair kernel
    (0, torch.float32, (9, 0), True, False, "bmm"),          # no triton: the copying fallback, last
])
def test_cuda_path(kernels, dtype, cap, aligned, has_triton, want):
    assert cuda_gemv_path(kernels, dtype, cap, aligned, has_triton) == want
