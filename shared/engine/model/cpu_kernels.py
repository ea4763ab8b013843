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
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TANDEM_AVX2 1
#endif

namespace {

// Shapes and pointers of one call. q: [B, Hq, D]; caches: [num_blocks, block_size, Hkv, D];
// block_tables: [B, max_blocks]; context_lens: [B]; out: [B, Hq, D]. All float32, contiguous.
struct Args {
  int64_t Hq, D, bs, Hkv, G, max_blocks, window;
  const float *q, *k, *v;
  const int64_t *bt, *cl;
  float* out;
  float scale;
};

// Portable path: any head size, any CPU.
void attend_scalar(const Args& a, int64_t b, std::vector<float>& scores, std::vector<float>&) {
  const int64_t ctx = a.cl[b], start = a.window > 0 ? std::max<int64_t>(0, ctx - a.window) : 0, n = ctx - start;
  scores.resize(n);
  for (int64_t hq = 0; hq < a.Hq; ++hq) {
    const float* qh = a.q + (b * a.Hq + hq) * a.D;
    const int64_t h = hq / a.G;  // grouped-query attention: G query heads per KV head
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = start; t < ctx; ++t) {
      const float* kh = a.k + ((a.bt[b * a.max_blocks + t / a.bs] * a.bs + t % a.bs) * a.Hkv + h) * a.D;
      float s = 0.f;
      for (int64_t d = 0; d < a.D; ++d) s += qh[d] * kh[d];
      scores[t - start] = s * a.scale;
      mx = std::max(mx, scores[t - start]);
    }
    float total = 0.f;
    for (int64_t i = 0; i < n; ++i) total += (scores[i] = std::exp(scores[i] - mx));
    float* oh = a.out + (b * a.Hq + hq) * a.D;
    std::fill(oh, oh + a.D, 0.f);
    for (int64_t t = start; t < ctx; ++t) {
      const float* vh = a.v + ((a.bt[b * a.max_blocks + t / a.bs] * a.bs + t % a.bs) * a.Hkv + h) * a.D;
      const float w = scores[t - start] / total;
      for (int64_t d = 0; d < a.D; ++d) oh[d] += w * vh[d];
    }
  }
}

#ifdef TANDEM_AVX2
// e^x for x <= 0 (scores minus their maximum): Cephes' polynomial on x = n ln2 + r, relative
// error below 2e-7; underflows to ~1e-38 instead of 0 below -87.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Eight vectors -> one vector of their eight horizontal sums, in order.
inline __m256 hsum8(const __m256* a) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// Prefetch the K or V rows of tokens [t, t + 8) (all KV heads; one row is contiguous).
template <typename RowFn>
inline void prefetch_rows(const float* base, RowFn row, int64_t t, int64_t ctx, int64_t row_bytes) {
  for (int64_t j = t; j < std::min(t + 8, ctx); ++j) {
    const char* p = reinterpret_cast<const char*>(base + row(j));
    for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  }
}

// NV = D / 8 vectors per head row. Tokens go in groups of eight, all KV heads of a group before
// the next, so each token's K and V rows ([Hkv, D], contiguous in their block) are read once and
// whole while the rows two groups ahead are prefetched (blocks of one sequence are scattered).
// Pass 1: the scores of all query heads, one transposed horizontal sum per eight dot products.
// Pass 2: a vectorized softmax per head. Pass 3: the weighted sum of values.
template <int NV>
void attend_avx2(const Args& a, int64_t b, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t ctx = a.cl[b], start = a.window > 0 ? std::max<int64_t>(0, ctx - a.window) : 0, n = ctx - start;
  const int64_t npad = (n + 7) / 8 * 8, row_bytes = a.Hkv * a.D * 4;
  scores.resize(a.Hq * npad);
  acc.assign(a.Hq * a.D, 0.f);
  const int64_t* table = a.bt + b * a.max_blocks;
  auto row = [&](int64_t t) { return (table[t / a.bs] * a.bs + t % a.bs) * a.Hkv * a.D; };
  const float* qb = a.q + b * a.Hq * a.D;
  const __m256 vscale = _mm256_set1_ps(a.scale);
  for (int64_t t0 = start; t0 < ctx; t0 += 8) {
    prefetch_rows(a.k, row, t0 + 16, ctx, row_bytes);
    const float* kr[8];
    for (int j = 0; j < 8; ++j) kr[j] = a.k + row(std::min(t0 + j, ctx - 1));
    for (int64_t hq = 0; hq < a.Hq; ++hq) {
      const float* qh = qb + hq * a.D;
      const int64_t koff = hq / a.G * a.D;  // grouped-query attention: G query heads per KV head
      __m256 s[8];
      __m256 qv = _mm256_loadu_ps(qh);
      for (int j = 0; j < 8; ++j) s[j] = _mm256_mul_ps(qv, _mm256_loadu_ps(kr[j] + koff));
      for (int v = 1; v < NV; ++v) {
        qv = _mm256_loadu_ps(qh + 8 * v);
        for (int j = 0; j < 8; ++j) s[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[j] + koff + 8 * v), s[j]);
      }
      _mm256_storeu_ps(scores.data() + hq * npad + (t0 - start), _mm256_mul_ps(hsum8(s), vscale));
    }
  }
  std::vector<float> inv(a.Hq);
  alignas(32) float tmp[8];
  const int64_t nv = n / 8 * 8;
  for (int64_t hq = 0; hq < a.Hq; ++hq) {
    float* sc = scores.data() + hq * npad;
    float mx = -std::numeric_limits<float>::infinity();
    __m256 m8 = _mm256_set1_ps(mx);
    for (int64_t i = 0; i < nv; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sc + i));
    _mm256_store_ps(tmp, m8);
    for (int j = 0; j < 8; ++j) mx = std::max(mx, tmp[j]);
    for (int64_t i = nv; i < n; ++i) mx = std::max(mx, sc[i]);
    const __m256 mxv = _mm256_set1_ps(mx);
    __m256 s8 = _mm256_setzero_ps();
    for (int64_t i = 0; i < nv; i += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + i), mxv));
      _mm256_storeu_ps(sc + i, e);
      s8 = _mm256_add_ps(s8, e);
    }
    _mm256_store_ps(tmp, s8);
    float total = 0.f;
    for (int j = 0; j < 8; ++j) total += tmp[j];
    for (int64_t i = nv; i < n; ++i) total += (sc[i] = std::exp(sc[i] - mx));
    for (int64_t i = n; i < npad; ++i) sc[i] = 0.f;  // the last group's padding weighs nothing
    inv[hq] = 1.f / total;
  }
  for (int64_t t0 = start; t0 < ctx; t0 += 8) {
    prefetch_rows(a.v, row, t0 + 16, ctx, row_bytes);
    const float* vr[8];
    for (int j = 0; j < 8; ++j) vr[j] = a.v + row(std::min(t0 + j, ctx - 1));
    for (int64_t hq = 0; hq < a.Hq; ++hq) {
      const float* w = scores.data() + hq * npad + (t0 - start);
      const int64_t voff = hq / a.G * a.D;
      float* ah = acc.data() + hq * a.D;
      for (int v = 0; v < NV; ++v) {
        __m256 x0 = _mm256_loadu_ps(ah + 8 * v), x1 = _mm256_setzero_ps();
        for (int j = 0; j < 8; j += 2) {  // two independent FMA chains
          x0 = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(vr[j] + voff + 8 * v), x0);
          x1 = _mm256_fmadd_ps(_mm256_set1_ps(w[j + 1]), _mm256_loadu_ps(vr[j + 1] + voff + 8 * v), x1);
        }
        _mm256_storeu_ps(ah + 8 * v, _mm256_add_ps(x0, x1));
      }
    }
  }
  float* ob = a.out + b * a.Hq * a.D;
  for (int64_t hq = 0; hq < a.Hq; ++hq) {
    const __m256 s = _mm256_set1_ps(inv[hq]);
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(ob + hq * a.D + 8 * v, _mm256_mul_ps(_mm256_loadu_ps(acc.data() + hq * a.D + 8 * v), s));
  }
}
#endif

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale, int64_t window) {
  auto out = torch::empty_like(q);
  Args a;
  a.Hq = q.size(1), a.D = q.size(2), a.bs = k_cache.size(1), a.Hkv = k_cache.size(2);
  a.G = a.Hq / a.Hkv, a.max_blocks = block_tables.size(1), a.window = window;
  a.q = q.data_ptr<float>(), a.k = k_cache.data_ptr<float>(), a.v = v_cache.data_ptr<float>();
  a.bt = block_tables.data_ptr<int64_t>(), a.cl = context_lens.data_ptr<int64_t>();
  a.out = out.data_ptr<float>(), a.scale = static_cast<float>(scale);
  void (*attend)(const Args&, int64_t, std::vector<float>&, std::vector<float>&) = attend_scalar;
#ifdef TANDEM_AVX2
  if (a.D == 32) attend = attend_avx2<4>;
  else if (a.D == 64) attend = attend_avx2<8>;
  else if (a.D == 128) attend = attend_avx2<16>;
#endif
  at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {  // one task per sequence
    std::vector<float> scores, acc;
    for (int64_t b = begin; b < end; ++b) attend(a, b, scores, acc);
  });
  return out;
}

int64_t vector_width() {
#ifdef TANDEM_AVX2
  return 8;
#else
  return 1;
#endif
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
            functions=["paged_decode_attention", "vector_width"],
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
