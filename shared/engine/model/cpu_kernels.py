"""A C++ paged-attention kernel for decode on CPU, compiled on first use.

Pure-PyTorch paged attention must first gather every sequence's blocks into one contiguous
tensor and then read it again; at decode time, on CPU, that copy costs more than the
attention itself. This kernel reads each key and value row once, straight from its block,
with a numerically stable softmax, one sequence per task across threads.

It is built with torch's JIT extension loader (needs a C++ compiler and ninja) and cached
by torch under ~/.cache/torch_extensions. When it cannot be built, `load()` returns None and
the engine keeps the pure-PyTorch path, which gives the same results.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] (float32, contiguous)
// block_tables: [B, max_blocks] int64; context_lens: [B] int64 -> out [B, Hq, D]
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale, int64_t window) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = Hq / Hkv, max_blocks = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  // one task per sequence: each key/value row [Hkv, D] of a token is contiguous and read once
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(Hq * D), mx(Hq), sum(Hq);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t ctx = cl[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const int64_t n = ctx - start;
      scores.resize(Hq * n);
      const float* qb = qp + b * Hq * D;
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t t = start; t < ctx; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* kr = kp + (blk * bs + t % bs) * Hkv * D;
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const float* qh = qb + hq * D;
          const float* kh = kr + (hq / G) * D;  // grouped-query attention: G query heads per KV head
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qh[d] * kh[d];
          s *= fscale;
          scores[hq * n + (t - start)] = s;
          mx[hq] = std::max(mx[hq], s);
        }
      }
      for (int64_t hq = 0; hq < Hq; ++hq) {
        float* sh = scores.data() + hq * n;
        const float m = mx[hq];
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < n; ++i) {
          sh[i] = std::exp(sh[i] - m);
          total += sh[i];
        }
        sum[hq] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = start; t < ctx; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* vr = vp + (blk * bs + t % bs) * Hkv * D;
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const float w = scores[hq * n + (t - start)];
          const float* vh = vr + (hq / G) * D;
          float* ah = acc.data() + hq * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ah[d] += w * vh[d];
        }
      }
      float* ob = op + b * Hq * D;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const float inv = 1.f / sum[hq];
        for (int64_t d = 0; d < D; ++d) ob[hq * D + d] = acc[hq * D + d] * inv;
      }
    }
  });
  return out;
}
"""


@functools.cache
def load():
    """The compiled module, or None when it cannot be built here (then callers use torch ops)."""
    # ninja comes with Tandem's Python dependencies; make it findable when the environment's
    # bin directory is not on PATH (e.g. `.venv/bin/python -m ...` without activating it)
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name="tandem_cpu_attention",
            cpp_sources=[_SOURCE],
            functions=["paged_decode_attention"],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback"
        log.warning("CPU attention kernel unavailable (%s); using the PyTorch path", e)
        return None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, D]; the caller checked `usable`."""
    return load().paged_decode_attention(q.contiguous(), k_cache, v_cache, block_tables, context_lens,
                                         scale, window or 0)


def usable(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32 and load() is not None
