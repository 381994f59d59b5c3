"""Keep one decode row's top candidates, in place: the CPU kernel of the vLLM plugin's per-slot decode path.

    keep_top_(h_c, wd_norm_c, k)   # h_c [1, n_C] (a row slice of h), wd_norm_c [n_C] fp32: all but the top k
                                   # of |h|·||Wd[:, j]|| become h·0 (ties: the lower index; NaN scores last)

The set kept is ``partition.candidate_topk``'s. The eager form (``keep_top_reference_``, seven ATen ops) costs
about 20 us per layer and row at batch 1 in vLLM's eager step on this CPU — a third of the per-slot GEMVs' time,
most of it dispatch; the C++ form is one call (a pass for the keys, ``nth_element``, a pass for the mask). It is
compiled once per machine and torch install with ``torch.utils.cpp_extension.load_inline`` (g++, ~30 s; cached
under ``TORCH_EXTENSIONS_DIR``); without a compiler ``keep_top_`` stays the eager form and says so once.
"""

from __future__ import annotations

import functools
import hashlib
import logging

import torch
from torch import Tensor

log = logging.getLogger("vllm.pop_fx")

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

// h_c [1, n] (unit stride), w [n] fp32: h_c[j] *= 0 for every j outside the top k of |h_c[j]|·w[j] by the key
// (fp32 bits of the score, NaN as -1) · 2^32 + (n - 1 - j): larger first, ties to the lower index.
void keep_top(torch::Tensor h_c, torch::Tensor w, int64_t k) {
  const int64_t n = h_c.size(-1);
  TORCH_CHECK(h_c.stride(-1) == 1 && w.is_contiguous() && w.scalar_type() == at::kFloat && w.numel() == n);
  if (k >= n) return;
  const float* wp = w.data_ptr<float>();
  std::vector<int64_t> keys(n), order(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h_c.scalar_type(), "keep_top", [&] {
    scalar_t* hp = h_c.data_ptr<scalar_t>();
    for (int64_t j = 0; j < n; ++j) {
      float s = std::fabs(static_cast<float>(hp[j])) * wp[j];
      if (std::isnan(s)) s = -1.0f;
      int32_t bits;
      std::memcpy(&bits, &s, sizeof bits);
      keys[j] = (static_cast<int64_t>(bits) << 32) + (n - 1 - j);
    }
    int64_t kth = INT64_MAX;
    if (k > 0) {
      order = keys;
      std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), std::greater<int64_t>());
      kth = order[k - 1];
    }
    const scalar_t zero = static_cast<scalar_t>(0.0f);
    for (int64_t j = 0; j < n; ++j)
      if (keys[j] < kth) hp[j] = hp[j] * zero;  // as h * mask: NaN and inf stay NaN
  });
}
"""


@functools.cache
def _compiled():
    try:
        from torch.utils.cpp_extension import load_inline

        # one build per torch install: two venvs sharing a name rebuild it in turn (ninja sees other include
        # paths), replacing the .so a running process has loaded
        where = hashlib.sha1(torch.__file__.encode()).hexdigest()[:10]
        return load_inline(name=f"pop_fx_keep_top_{where}", cpp_sources=[_SOURCE], functions=["keep_top"],
                           extra_cflags=["-O3"], verbose=False).keep_top
    except Exception as e:  # no compiler, no headers: the eager form works everywhere
        log.warning("pop_fx: the C++ keep_top did not build (%s): the decode path selects with eager ops", e)
        return None


def keep_top_reference_(h_c: Tensor, wd_norm_c: Tensor, k: int) -> None:
    """The eager form: keys as ``partition.rank_keys`` orders |h|·||Wd[:, j]|| (never negative here, so a
    non-negative fp32's bits order as it does; NaN becomes -1), the k-th largest key, a mask."""
    if k >= h_c.shape[-1]:
        return
    keys = candidate_keys(h_c, wd_norm_c)
    if k == 0:
        h_c.mul_(0)
        return
    kth = torch.kthvalue(keys, keys.shape[-1] - k + 1, dim=-1, keepdim=True).values
    h_c.mul_(keys >= kth)


def candidate_keys(h_c: Tensor, wd_norm_c: Tensor) -> Tensor:
    """int64 keys of h_c [1, n_C]'s candidates, unique, ordered as ``partition.rank_keys`` orders the scores."""
    s = torch.mul(h_c.abs(), wd_norm_c)  # fp32 (wd_norm_c is): |h| widened exactly, as candidate_scores does
    bits = torch.nan_to_num_(s, nan=-1.0, posinf=float("inf")).view(torch.int32)
    return torch.add(_tie_breaks(s.shape[-1]), bits, alpha=1 << 32)  # bits · 2³² + (n - 1 - j)


@functools.cache
def _tie_breaks(n: int) -> Tensor:
    return (n - 1) - torch.arange(n, dtype=torch.int64)


def keep_top_(h_c: Tensor, wd_norm_c: Tensor, k: int) -> None:
    kernel = _compiled() if h_c.device.type == "cpu" else None
    if kernel is None:
        keep_top_reference_(h_c, wd_norm_c, k)
    else:
        kernel(h_c, wd_norm_c, k)


def kernel():
    """The compiled C++ function (built on first call), or None where it cannot be built."""
    return _compiled()


__all__ = ["candidate_keys", "keep_top_", "keep_top_reference_", "kernel"]
