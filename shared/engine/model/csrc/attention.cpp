// Paged decode attention over a KV cache of float32 / bfloat16 / float16 rows, or of packed
// 8-bit rows (fp8 e4m3 or int8 elements, one E8M0 scale byte per 32; see kv_quant.py), read
// in place. Also the write of new keys/values into a packed cache (quantize on the way in).
// The first file of the extension: the includes and the vector helpers live here.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TANDEM_AVX2 1
#endif

// A region compiled without fast-math whatever the extension's flags (int8_linear's exact
// reciprocal, small_linear's fixed summation order).
#if defined(__clang__)
#define TANDEM_PRECISE_BEGIN _Pragma("float_control(precise, on, push)")
#define TANDEM_PRECISE_END _Pragma("float_control(pop)")
#elif defined(__GNUC__)
#define TANDEM_PRECISE_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"no-fast-math\")")
#define TANDEM_PRECISE_END _Pragma("GCC pop_options")
#else
#define TANDEM_PRECISE_BEGIN
#define TANDEM_PRECISE_END
#endif

namespace {

// Shapes and pointers of one call. q: [B, Hq, D] float32; caches: [num_blocks, block_size, Hkv, W]
// of the reader's element type (W = D for float rows, D + D/32 bytes for packed rows);
// block_tables: [B, max_blocks]; context_lens: [B]; out: [B, Hq, D] float32. All contiguous.
// Arithmetic is float32 whatever the cache holds.
struct Args {
  int64_t Hq, D, W, bs, Hkv, G, max_blocks, window;
  const float* q;
  const void *k, *v;
  const int64_t *bt, *cl;
  float* out;
  float scale;
};

// Per-task working memory, reused from one sequence to the next.
struct Scratch {
  std::vector<float> scores, acc, inv, stage;
  std::vector<int64_t> rows;
};

inline float e8m0(uint8_t b) {  // 2^(b - 127), b >= 1
  const uint32_t u = static_cast<uint32_t>(b) << 23;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp8 e4m3 bits -> the float16 bits of 2^-8 times its value (sign moved up, exponent and
// mantissa shifted into float16's; subnormals map to subnormals). The 2^8 goes into the scale.
inline uint16_t fp8_as_half_bits(uint8_t b) {
  return static_cast<uint16_t>(((b & 0x80) << 8) | ((b & 0x7f) << 7));
}

#ifdef TANDEM_AVX2
// Eight consecutive elements as float32.
inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 ld8(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
inline __m256 ld8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 ld8_fp8(const uint8_t* p) {  // 2^-8 times the values
  // sign-extended to 16 bits and shifted by 7: exponent and mantissa land where float16 keeps
  // them and the sign fills bits 14 and 15; clearing bit 14 leaves fp8_as_half_bits
  const __m128i x = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 7);
  return _mm256_cvtph_ps(_mm_and_si128(x, _mm_set1_epi16(static_cast<short>(0xBF80))));
}
inline __m256 ld8_i8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// How a head row of the cache is read. `row` points at one token's head: D elements of T.
template <typename T>
struct Plain {
  using E = T;
  static constexpr bool kStaged = false;
  static int64_t width(int64_t D) { return D; }
  static float get(const E* row, int64_t d, int64_t) { return static_cast<float>(row[d]); }
#ifdef TANDEM_AVX2
  static __m256 get8(const E* row, int v, int64_t) { return ld8(row + 8 * v); }
#endif
};

// Packed 8-bit rows: D element bytes, then D/32 E8M0 scale bytes.
template <bool FP8>
struct Packed {
  using E = uint8_t;
  // decoded once per group of tokens into float32 scratch, not once per query head reading it
  static constexpr bool kStaged = true;
  static int64_t width(int64_t D) { return D + D / 32; }
  static float scale(const E* row, int64_t g, int64_t D) { return e8m0(row[D + g]) * (FP8 ? 256.f : 1.f); }
  static float elem(uint8_t b) {
    if (FP8) return static_cast<float>(c10::Half(fp8_as_half_bits(b), c10::Half::from_bits()));
    return static_cast<float>(static_cast<int8_t>(b));
  }
  static float get(const E* row, int64_t d, int64_t D) { return elem(row[d]) * scale(row, d / 32, D); }
#ifdef TANDEM_AVX2
  // a head row of D = 8 NV elements into float32, one scale broadcast per 32-element group
  template <int NV>
  static void decode_row(const E* row, float* dst) {
    for (int g = 0; g < NV / 4; ++g) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
      const __m512 sc = _mm512_set1_ps(scale(row, g, 8 * NV));
      for (int u = 0; u < 2; ++u) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 32 * g + 16 * u));
        __m512 x;
        if (FP8) {  // as ld8_fp8, sixteen at a time
          const __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7);
          x = _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0xBF80))));
        } else {
          x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        }
        _mm512_storeu_ps(dst + 32 * g + 16 * u, _mm512_mul_ps(x, sc));
      }
#else
      const __m256 sc = _mm256_set1_ps(scale(row, g, 8 * NV));
      for (int u = 0; u < 4; ++u) {
        const uint8_t* p = row + 32 * g + 8 * u;
        _mm256_storeu_ps(dst + 32 * g + 8 * u, _mm256_mul_ps(FP8 ? ld8_fp8(p) : ld8_i8(p), sc));
      }
#endif
    }
  }
#endif
};

// Portable path: any head size, any CPU.
template <typename R>
void attend_scalar(const Args& a, int64_t b, Scratch& w) {
  using E = typename R::E;
  std::vector<float>& scores = w.scores;
  const E* kc = static_cast<const E*>(a.k);
  const E* vc = static_cast<const E*>(a.v);
  const int64_t ctx = a.cl[b], start = a.window > 0 ? std::max<int64_t>(0, ctx - a.window) : 0, n = ctx - start;
  scores.resize(n);
  for (int64_t hq = 0; hq < a.Hq; ++hq) {
    const float* qh = a.q + (b * a.Hq + hq) * a.D;
    const int64_t h = hq / a.G;  // grouped-query attention: G query heads per KV head
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = start; t < ctx; ++t) {
      const E* kh = kc + ((a.bt[b * a.max_blocks + t / a.bs] * a.bs + t % a.bs) * a.Hkv + h) * a.W;
      float s = 0.f;
      for (int64_t d = 0; d < a.D; ++d) s += qh[d] * R::get(kh, d, a.D);
      scores[t - start] = s * a.scale;
      mx = std::max(mx, scores[t - start]);
    }
    float total = 0.f;
    for (int64_t i = 0; i < n; ++i) total += (scores[i] = std::exp(scores[i] - mx));
    float* oh = a.out + (b * a.Hq + hq) * a.D;
    std::fill(oh, oh + a.D, 0.f);
    for (int64_t t = start; t < ctx; ++t) {
      const E* vh = vc + ((a.bt[b * a.max_blocks + t / a.bs] * a.bs + t % a.bs) * a.Hkv + h) * a.W;
      const float wt = scores[t - start] / total;
      for (int64_t d = 0; d < a.D; ++d) oh[d] += wt * R::get(vh, d, a.D);
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

// Eight tokens' rows (all KV heads) decoded into float32 scratch [8][Hkv][D]: an 8-bit cache
// costs its conversion once per element instead of once per query head of the group.
template <typename R, int NV>
inline void stage8(const typename R::E* const* r, const Args& a, float* buf, const float** out) {
  for (int j = 0; j < 8; ++j) {
    float* dst = buf + j * a.Hkv * a.D;
    for (int64_t h = 0; h < a.Hkv; ++h) R::template decode_row<NV>(r[j] + h * a.W, dst + h * a.D);
    out[j] = dst;
  }
}

// Pass 1 for eight tokens whose head h starts at kr[j] + h * hs: every query head's scores,
// one transposed horizontal sum per eight dot products.
template <typename R, int NV>
inline void scores8(const typename R::E* const* kr, int64_t hs, const Args& a, const float* qb, float* sc,
                    int64_t npad, __m256 vscale) {
  for (int64_t hq = 0; hq < a.Hq; ++hq) {
    const float* qh = qb + hq * a.D;
    const int64_t koff = hq / a.G * hs;  // grouped-query attention: G query heads per KV head
    __m256 s[8];
    __m256 qv = _mm256_loadu_ps(qh);
    for (int j = 0; j < 8; ++j) s[j] = _mm256_mul_ps(qv, R::get8(kr[j] + koff, 0, a.D));
    for (int v = 1; v < NV; ++v) {
      qv = _mm256_loadu_ps(qh + 8 * v);
      for (int j = 0; j < 8; ++j) s[j] = _mm256_fmadd_ps(qv, R::get8(kr[j] + koff, v, a.D), s[j]);
    }
    _mm256_storeu_ps(sc + hq * npad, _mm256_mul_ps(hsum8(s), vscale));
  }
}

// Pass 3 for eight tokens: acc[hq] += sum_j weight[hq][j] * value row j.
template <typename R, int NV>
inline void values8(const typename R::E* const* vr, int64_t hs, const Args& a, const float* wts, int64_t npad,
                    float* acc) {
  for (int64_t hq = 0; hq < a.Hq; ++hq) {
    const float* wt = wts + hq * npad;
    const int64_t voff = hq / a.G * hs;
    float* ah = acc + hq * a.D;
    for (int v = 0; v < NV; ++v) {
      __m256 x0 = _mm256_loadu_ps(ah + 8 * v), x1 = _mm256_setzero_ps();
      for (int j = 0; j < 8; j += 2) {  // two independent FMA chains
        x0 = _mm256_fmadd_ps(_mm256_set1_ps(wt[j]), R::get8(vr[j] + voff, v, a.D), x0);
        x1 = _mm256_fmadd_ps(_mm256_set1_ps(wt[j + 1]), R::get8(vr[j + 1] + voff, v, a.D), x1);
      }
      _mm256_storeu_ps(ah + 8 * v, _mm256_add_ps(x0, x1));
    }
  }
}

// Tokens [0, n) of a sequence in groups of eight (the last token repeated to fill the last
// group): prefetches the rows two groups ahead, then calls fn(rows, head stride, first token)
// with the group's eight head-0 row pointers; an 8-bit cache's rows are first decoded into
// float32 scratch (stage8), so fn then reads Plain<float> rows of stride D.
template <typename R, int NV, typename Fn>
inline void each_group8(const typename R::E* base, const std::vector<int64_t>& rows, int64_t n, const Args& a,
                        Scratch& w, Fn&& fn) {
  const int64_t row_bytes = a.Hkv * a.W * static_cast<int64_t>(sizeof(typename R::E));
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    prefetch_rows(base, rows.data(), i0 + 16, n, row_bytes);
    const typename R::E* r[8];
    for (int j = 0; j < 8; ++j) r[j] = base + rows[std::min(i0 + j, n - 1)];
    if constexpr (R::kStaged) {
      const float* f[8];
      stage8<R, NV>(r, a, w.stage.data(), f);
      fn(f, a.D, i0);
    } else {
      fn(r, a.W, i0);
    }
  }
}

// NV = D / 8 vectors per head row. Tokens go in groups of eight, all KV heads of a group before
// the next, so each token's K and V rows ([Hkv, W], contiguous in their block) are read once and
// whole while the rows two groups ahead are prefetched (blocks of one sequence are scattered).
// Pass 1: the scores of all query heads. Pass 2: a vectorized softmax per head. Pass 3: the
// weighted sum of values.
template <typename R, int NV>
void attend_avx2(const Args& a, int64_t b, Scratch& w) {
  using E = typename R::E;
  std::vector<float>&scores = w.scores, &acc = w.acc, &inv = w.inv;
  std::vector<int64_t>& rows = w.rows;
  const E* kc = static_cast<const E*>(a.k);
  const E* vc = static_cast<const E*>(a.v);
  const int64_t ctx = a.cl[b], start = a.window > 0 ? std::max<int64_t>(0, ctx - a.window) : 0, n = ctx - start;
  const int64_t npad = (n + 7) / 8 * 8;
  scores.resize(a.Hq * npad);
  acc.assign(a.Hq * a.D, 0.f);
  if (R::kStaged) w.stage.resize(8 * a.Hkv * a.D);
  // offset of each context token's row in the cache, walked block by block (no divisions later)
  rows.resize(n);
  const int64_t* table = a.bt + b * a.max_blocks;
  for (int64_t i = 0, blk = start / a.bs, off = start % a.bs; i < n; ++i) {
    rows[i] = (table[blk] * a.bs + off) * a.Hkv * a.W;
    if (++off == a.bs) off = 0, ++blk;
  }
  const float* qb = a.q + b * a.Hq * a.D;
  const __m256 vscale = _mm256_set1_ps(a.scale);
  using Rd = std::conditional_t<R::kStaged, Plain<float>, R>;  // how passes 1 and 3 read a row
  each_group8<R, NV>(kc, rows, n, a, w, [&](const typename Rd::E* const* kr, int64_t hs, int64_t i0) {
    scores8<Rd, NV>(kr, hs, a, qb, scores.data() + i0, npad, vscale);
  });
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
  each_group8<R, NV>(vc, rows, n, a, w, [&](const typename Rd::E* const* vr, int64_t hs, int64_t i0) {
    values8<Rd, NV>(vr, hs, a, scores.data() + i0, npad, acc.data());
  });
  float* ob = a.out + b * a.Hq * a.D;
  for (int64_t hq = 0; hq < a.Hq; ++hq) {
    const __m256 s = _mm256_set1_ps(inv[hq]);
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(ob + hq * a.D + 8 * v, _mm256_mul_ps(_mm256_loadu_ps(acc.data() + hq * a.D + 8 * v), s));
  }
}
#endif

using AttendFn = void (*)(const Args&, int64_t, Scratch&);

template <typename R>
AttendFn pick(int64_t D) {
#ifdef TANDEM_AVX2
  if (D == 32) return attend_avx2<R, 4>;
  if (D == 64) return attend_avx2<R, 8>;
  if (D == 128) return attend_avx2<R, 16>;
#endif
  return attend_scalar<R>;
}

// One token's head row x[0..D) -> D element bytes + D/32 E8M0 scale bytes (kv_quant.quantize's
// arithmetic exactly: the scale is the smallest power of two 2^e with amax / 2^e <= top).
template <typename T, bool FP8>
void quantize_row(const T* x, uint8_t* out, int64_t D) {
  // a product with the float32 reciprocal (what -ffast-math makes of a division anyway; the
  // Python reference multiplies by the same constant)
  const float inv_top = FP8 ? static_cast<float>(1.0 / 448.0) : static_cast<float>(1.0 / 127.0);
  for (int64_t g = 0; g < D / 32; ++g) {
    const T* xg = x + g * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(static_cast<float>(xg[i])));
    int ex = 0;
    const float m = std::frexp(amax * inv_top, &ex);
    const int e = std::min(std::max(m == 0.5f ? ex - 1 : ex, -126), 126);
    const uint32_t inv_bits = static_cast<uint32_t>(127 - e) << 23;
    float inv;
    std::memcpy(&inv, &inv_bits, 4);
    for (int i = 0; i < 32; ++i) {
      const float y = static_cast<float>(xg[i]) * inv;
      if (FP8) {
        out[g * 32 + i] = c10::Float8_e4m3fn(std::min(std::max(y, -448.f), 448.f)).x;
      } else {
        out[g * 32 + i] = static_cast<uint8_t>(static_cast<int8_t>(std::min(std::max(std::nearbyint(y), -127.f), 127.f)));
      }
    }
    out[D + g] = static_cast<uint8_t>(e + 127);
  }
}

template <typename T, bool FP8>
void write_rows(const torch::Tensor& x, torch::Tensor& cache, const int64_t* slots) {
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2), W = D + D / 32;
  const T* xp = x.data_ptr<T>();
  uint8_t* cp = static_cast<uint8_t*>(cache.data_ptr());
  at::parallel_for(0, T_ * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      quantize_row<T, FP8>(xp + r * D, cp + (slots[r / H] * H + r % H) * W, D);
  });
}

}  // namespace

// q: [B, Hq, D] float32 -> float32 [B, Hq, D]; the caches may be float32, bfloat16, float16, or packed
// 8-bit (uint8: fp8 e4m3 rows, int8: int8 rows, each with its E8M0 scales; last dim D + D/32).
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
  a.Hq = q.size(1), a.D = q.size(2), a.W = k_cache.size(3), a.bs = k_cache.size(1), a.Hkv = k_cache.size(2);
  a.G = a.Hq / a.Hkv, a.max_blocks = block_tables.size(1), a.window = window;
  a.q = q.data_ptr<float>(), a.k = k_cache.data_ptr(), a.v = v_cache.data_ptr();
  a.bt = block_tables.data_ptr<int64_t>(), a.cl = context_lens.data_ptr<int64_t>();
  a.out = out.data_ptr<float>(), a.scale = static_cast<float>(scale);
  const bool packed = k_cache.scalar_type() == torch::kUInt8 || k_cache.scalar_type() == torch::kInt8;
  TORCH_CHECK(a.W == (packed ? a.D + a.D / 32 : a.D) && (!packed || a.D % 32 == 0),
              "cache rows of ", a.W, " elements do not fit head size ", a.D);
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
    case torch::kFloat32: attend = pick<Plain<float>>(a.D); break;
    case torch::kBFloat16: attend = pick<Plain<at::BFloat16>>(a.D); break;
    case torch::kFloat16: attend = pick<Plain<at::Half>>(a.D); break;
    case torch::kUInt8: attend = pick<Packed<true>>(a.D); break;
    case torch::kInt8: attend = pick<Packed<false>>(a.D); break;
    default: TORCH_CHECK(false, "unsupported KV cache dtype ", k_cache.scalar_type());
  }
  at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {  // one task per sequence
    Scratch w;
    for (int64_t b = begin; b < end; ++b) attend(a, b, w);
  });
  return out;
}

// k, v: [T, Hkv, D] (float32 / bfloat16 / float16) -> quantized into the packed caches
// [num_blocks, block_size, Hkv, D + D/32] at slot_mapping[t] (uint8 cache: fp8, int8 cache: int8).
void write_kv_packed(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor slot_mapping) {
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() && k.dim() == 3 &&
              k.scalar_type() == v.scalar_type(), "write_kv_packed: k and v contiguous [T, H, D] of one dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
              (k_cache.scalar_type() == torch::kUInt8 || k_cache.scalar_type() == torch::kInt8),
              "write_kv_packed: contiguous packed caches");
  TORCH_CHECK(k.size(2) % 32 == 0 && k_cache.size(3) == k.size(2) + k.size(2) / 32 && k_cache.size(2) == k.size(1),
              "write_kv_packed: cache rows do not fit the keys");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() &&
              slot_mapping.numel() == k.size(0), "write_kv_packed: one int64 slot per token");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot ", slots[t], " out of range");
  const bool fp8 = k_cache.scalar_type() == torch::kUInt8;
  for (auto* pair : {&k, &v}) {
    torch::Tensor& cache = pair == &k ? k_cache : v_cache;
    switch (k.scalar_type()) {
      case torch::kFloat32: fp8 ? write_rows<float, true>(*pair, cache, slots) : write_rows<float, false>(*pair, cache, slots); break;
      case torch::kBFloat16: fp8 ? write_rows<at::BFloat16, true>(*pair, cache, slots) : write_rows<at::BFloat16, false>(*pair, cache, slots); break;
      case torch::kFloat16: fp8 ? write_rows<at::Half, true>(*pair, cache, slots) : write_rows<at::Half, false>(*pair, cache, slots); break;
      default: TORCH_CHECK(false, "write_kv_packed: unsupported dtype ", k.scalar_type());
    }
  }
}
