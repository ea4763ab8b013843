"""C++ kernels for the CPU engine, compiled on first use: paged decode attention, and the
float32 element-wise parts of a decoder layer fused (RMSNorm, SiLU-and-multiply, RoPE).

Pure-PyTorch paged attention must first gather every sequence's blocks into one contiguous
tensor and then read it again; at decode time, on CPU, that copy costs more than the
attention itself. This kernel reads each key and value row once, straight from its block,
with a numerically stable softmax, one sequence per task across threads. The cache may be
float32, bfloat16 or float16 (read as is, computed in float32); with AVX2 and head sizes
32/64/128 it runs vectorized, otherwise a portable scalar loop.

The fused element-wise ops save the round trips through memory and the per-op dispatch of
the PyTorch formulas (at a 1024-token prefill step, SiLU-and-multiply alone took 1.8 ms as
two ops and takes 0.2 ms fused).

They are built with torch's JIT extension loader (needs a C++ compiler and ninja) and cached
by torch under ~/.cache/torch_extensions. When they cannot be built, `load()` returns None and
the engine keeps the pure-PyTorch path, which gives the same results.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TANDEM_AVX2 1
#endif

namespace {

// Shapes and pointers of one call. q: [B, Hq, D] float32; caches: [num_blocks, block_size, Hkv, D]
// of T (float32, bfloat16 or float16); block_tables: [B, max_blocks]; context_lens: [B];
// out: [B, Hq, D] float32. All contiguous. Arithmetic is float32 whatever T is.
struct Args {
  int64_t Hq, D, bs, Hkv, G, max_blocks, window;
  const float* q;
  const void *k, *v;
  const int64_t *bt, *cl;
  float* out;
  float scale;
};

// Per-task working memory, reused from one sequence to the next.
struct Scratch {
  std::vector<float> scores, acc, inv;
  std::vector<int64_t> rows;
};

template <typename T>
inline float ld1(const T* p) { return static_cast<float>(*p); }

// Portable path: any head size, any CPU.
template <typename T>
void attend_scalar(const Args& a, int64_t b, Scratch& w) {
  std::vector<float>& scores = w.scores;
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int64_t ctx = a.cl[b], start = a.window > 0 ? std::max<int64_t>(0, ctx - a.window) : 0, n = ctx - start;
  scores.resize(n);
  for (int64_t hq = 0; hq < a.Hq; ++hq) {
    const float* qh = a.q + (b * a.Hq + hq) * a.D;
    const int64_t h = hq / a.G;  // grouped-query attention: G query heads per KV head
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = start; t < ctx; ++t) {
      const T* kh = kc + ((a.bt[b * a.max_blocks + t / a.bs] * a.bs + t % a.bs) * a.Hkv + h) * a.D;
      float s = 0.f;
      for (int64_t d = 0; d < a.D; ++d) s += qh[d] * ld1(kh + d);
      scores[t - start] = s * a.scale;
      mx = std::max(mx, scores[t - start]);
    }
    float total = 0.f;
    for (int64_t i = 0; i < n; ++i) total += (scores[i] = std::exp(scores[i] - mx));
    float* oh = a.out + (b * a.Hq + hq) * a.D;
    std::fill(oh, oh + a.D, 0.f);
    for (int64_t t = start; t < ctx; ++t) {
      const T* vh = vc + ((a.bt[b * a.max_blocks + t / a.bs] * a.bs + t % a.bs) * a.Hkv + h) * a.D;
      const float w = scores[t - start] / total;
      for (int64_t d = 0; d < a.D; ++d) oh[d] += w * ld1(vh + d);
    }
  }
}

#ifdef TANDEM_AVX2
// e^x: Cephes' polynomial on x = n ln2 + r, relative error below 2e-7; x is clamped to
// [-87, 88] (so it gives ~1e-38 instead of 0 far below, and no infinity above).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
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

// Eight consecutive elements as float32.
inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 ld8(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
inline __m256 ld8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Eight vectors -> one vector of their eight horizontal sums, in order.
inline __m256 hsum8(const __m256* a) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// Prefetch the K or V rows of tokens [i, i + 8) of the sequence (all KV heads; a row is contiguous).
template <typename T>
inline void prefetch_rows(const T* base, const int64_t* rows, int64_t i, int64_t n, int64_t row_bytes) {
  for (int64_t j = i; j < std::min(i + 8, n); ++j) {
    const char* p = reinterpret_cast<const char*>(base + rows[j]);
    for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  }
}

// NV = D / 8 vectors per head row. Tokens go in groups of eight, all KV heads of a group before
// the next, so each token's K and V rows ([Hkv, D], contiguous in their block) are read once and
// whole while the rows two groups ahead are prefetched (blocks of one sequence are scattered).
// Pass 1: the scores of all query heads, one transposed horizontal sum per eight dot products.
// Pass 2: a vectorized softmax per head. Pass 3: the weighted sum of values.
template <typename T, int NV>
void attend_avx2(const Args& a, int64_t b, Scratch& w) {
  std::vector<float>&scores = w.scores, &acc = w.acc, &inv = w.inv;
  std::vector<int64_t>& rows = w.rows;
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int64_t ctx = a.cl[b], start = a.window > 0 ? std::max<int64_t>(0, ctx - a.window) : 0, n = ctx - start;
  const int64_t npad = (n + 7) / 8 * 8, row_bytes = a.Hkv * a.D * static_cast<int64_t>(sizeof(T));
  scores.resize(a.Hq * npad);
  acc.assign(a.Hq * a.D, 0.f);
  // offset of each context token's row in the cache, walked block by block (no divisions later)
  rows.resize(n);
  const int64_t* table = a.bt + b * a.max_blocks;
  for (int64_t i = 0, blk = start / a.bs, off = start % a.bs; i < n; ++i) {
    rows[i] = (table[blk] * a.bs + off) * a.Hkv * a.D;
    if (++off == a.bs) off = 0, ++blk;
  }
  const float* qb = a.q + b * a.Hq * a.D;
  const __m256 vscale = _mm256_set1_ps(a.scale);
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    prefetch_rows(kc, rows.data(), i0 + 16, n, row_bytes);
    const T* kr[8];
    for (int j = 0; j < 8; ++j) kr[j] = kc + rows[std::min(i0 + j, n - 1)];
    for (int64_t hq = 0; hq < a.Hq; ++hq) {
      const float* qh = qb + hq * a.D;
      const int64_t koff = hq / a.G * a.D;  // grouped-query attention: G query heads per KV head
      __m256 s[8];
      __m256 qv = _mm256_loadu_ps(qh);
      for (int j = 0; j < 8; ++j) s[j] = _mm256_mul_ps(qv, ld8(kr[j] + koff));
      for (int v = 1; v < NV; ++v) {
        qv = _mm256_loadu_ps(qh + 8 * v);
        for (int j = 0; j < 8; ++j) s[j] = _mm256_fmadd_ps(qv, ld8(kr[j] + koff + 8 * v), s[j]);
      }
      _mm256_storeu_ps(scores.data() + hq * npad + i0, _mm256_mul_ps(hsum8(s), vscale));
    }
  }
  inv.resize(a.Hq);
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
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    prefetch_rows(vc, rows.data(), i0 + 16, n, row_bytes);
    const T* vr[8];
    for (int j = 0; j < 8; ++j) vr[j] = vc + rows[std::min(i0 + j, n - 1)];
    for (int64_t hq = 0; hq < a.Hq; ++hq) {
      const float* wt = scores.data() + hq * npad + i0;
      const int64_t voff = hq / a.G * a.D;
      float* ah = acc.data() + hq * a.D;
      for (int v = 0; v < NV; ++v) {
        __m256 x0 = _mm256_loadu_ps(ah + 8 * v), x1 = _mm256_setzero_ps();
        for (int j = 0; j < 8; j += 2) {  // two independent FMA chains
          x0 = _mm256_fmadd_ps(_mm256_set1_ps(wt[j]), ld8(vr[j] + voff + 8 * v), x0);
          x1 = _mm256_fmadd_ps(_mm256_set1_ps(wt[j + 1]), ld8(vr[j + 1] + voff + 8 * v), x1);
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

using AttendFn = void (*)(const Args&, int64_t, Scratch&);

template <typename T>
AttendFn pick(int64_t D) {
#ifdef TANDEM_AVX2
  if (D == 32) return attend_avx2<T, 4>;
  if (D == 64) return attend_avx2<T, 8>;
  if (D == 128) return attend_avx2<T, 16>;
#endif
  return attend_scalar<T>;
}

}  // namespace

// q: [B, Hq, D] float32 -> float32 [B, Hq, D]; the caches may be float32, bfloat16 or float16.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale, int64_t window) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous(), "q must be contiguous float32");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k and v caches must be contiguous and of one dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() &&
              context_lens.scalar_type() == torch::kInt64 && context_lens.is_contiguous(),
              "block_tables and context_lens must be contiguous int64");
  auto out = torch::empty_like(q);
  Args a;
  a.Hq = q.size(1), a.D = q.size(2), a.bs = k_cache.size(1), a.Hkv = k_cache.size(2);
  a.G = a.Hq / a.Hkv, a.max_blocks = block_tables.size(1), a.window = window;
  a.q = q.data_ptr<float>(), a.k = k_cache.data_ptr(), a.v = v_cache.data_ptr();
  a.bt = block_tables.data_ptr<int64_t>(), a.cl = context_lens.data_ptr<int64_t>();
  a.out = out.data_ptr<float>(), a.scale = static_cast<float>(scale);
  // Never read outside the cache: every context fits its table, every block it uses exists.
  const int64_t num_blocks = k_cache.size(0);
  for (int64_t b = 0; b < q.size(0); ++b) {
    const int64_t ctx = a.cl[b];
    TORCH_CHECK(ctx >= 1 && ctx <= a.max_blocks * a.bs, "context length ", ctx, " out of range for row ", b);
    for (int64_t i = 0; i < (ctx + a.bs - 1) / a.bs; ++i) {
      const int64_t blk = a.bt[b * a.max_blocks + i];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block id ", blk, " out of range for row ", b);
    }
  }
  AttendFn attend;
  switch (k_cache.scalar_type()) {
    case torch::kFloat32: attend = pick<float>(a.D); break;
    case torch::kBFloat16: attend = pick<at::BFloat16>(a.D); break;
    case torch::kFloat16: attend = pick<at::Half>(a.D); break;
    default: TORCH_CHECK(false, "unsupported KV cache dtype ", k_cache.scalar_type());
  }
  at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {  // one task per sequence
    Scratch w;
    for (int64_t b = begin; b < end; ++b) attend(a, b, w);
  });
  return out;
}

// ---- the element-wise parts of a decoder layer, fused (float32; HF Llama's formulas) ----

// weight * (x / sqrt(mean(x^2) + eps)) over the last dim
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && weight.scalar_type() == torch::kFloat32 &&
              weight.is_contiguous() && weight.numel() == x.size(-1), "rms_norm: contiguous float32 inputs");
  const int64_t H = x.size(-1), T = x.numel() / H;
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* r = xp + t * H;
      float* o = op + t * H;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) ss += r[i] * r[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + feps);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) o[i] = w[i] * (r[i] * inv);
    }
  });
  return out;
}

// silu(gate) * up, element-wise
torch::Tensor silu_and_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.scalar_type() == torch::kFloat32 && up.scalar_type() == torch::kFloat32 && gate.is_contiguous() &&
              up.is_contiguous() && gate.sizes() == up.sizes(), "silu_and_mul: contiguous float32 inputs of one shape");
  auto out = torch::empty_like(gate);
  const float *g = gate.data_ptr<float>(), *u = up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, gate.numel(), 4096, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#ifdef TANDEM_AVX2
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (; i + 8 <= end; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(zero, x))));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < end; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  });
  return out;
}

// In place, rotate-half convention: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
// q: [T, Hq, D], k: [T, Hkv, D]; cos, sin: [T, D]
void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
              cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && q.is_contiguous() &&
              k.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "rope_: contiguous float32 inputs");
  const int64_t T = q.size(0), Hq = q.size(1), Hk = k.size(1), D = q.size(2), half = D / 2;
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *c = cp + t * D, *s = sp + t * D;
      for (int64_t h = 0; h < Hq + Hk; ++h) {
        float* x = h < Hq ? qp + (t * Hq + h) * D : kp + (t * Hk + h - Hq) * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half];
          x[i] = a * c[i] - b * s[i];
          x[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}
"""


_NAME = "tandem_cpu_kernels"


def _built() -> bool:
    """Whether a compiled module is in torch's extension cache (a guess: a changed source rebuilds)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(_NAME, False)) / f"{_NAME}.so").is_file()
    except Exception:  # noqa: BLE001 - a private helper; without it, say nothing
        return True


@functools.cache
def load():
    """The compiled module, or None when it cannot be built here (then callers use torch ops)."""
    # ninja comes with Tandem's Python dependencies; make it findable when the environment's
    # bin directory is not on PATH (e.g. `.venv/bin/python -m ...` without activating it)
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    start = time.monotonic()
    if not _built():
        log.info("compiling the CPU kernels (first start only: about a minute; cached afterwards)")
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(
            name=_NAME,
            cpp_sources=[_SOURCE],
            functions=["paged_decode_attention", "rms_norm", "silu_and_mul", "rope_"],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],
            verbose=False,
        )
        if time.monotonic() - start > 5:
            log.info("CPU kernels ready after %.0f s", time.monotonic() - start)
        return module
    except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback"
        log.warning("CPU kernels unavailable (%s); using the PyTorch path", e)
        return None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, D] in q's dtype; the caller checked `usable`. The caches keep their
    dtype (bfloat16 halves the bytes read); arithmetic is float32."""
    out = load().paged_decode_attention(q.float().contiguous(), k_cache, v_cache, block_tables, context_lens,
                                        scale, window or 0)
    return out.to(q.dtype)


KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode attention runs here for tensors of this device and dtype."""
    return device.type == "cpu" and dtype in KV_DTYPES and load() is not None


def usable(q: torch.Tensor) -> bool:
    return supports(q.device, q.dtype)


def fused_ok(x: torch.Tensor) -> bool:
    """Whether the fused float32 element-wise ops (rms_norm, silu_and_mul, rope_) apply to x.
    Half precision keeps the PyTorch ops, whose rounding steps match HF's."""
    return x.dtype == torch.float32 and supports(x.device, x.dtype)
