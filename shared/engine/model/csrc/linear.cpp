// ---- float32 linear for a few rows: y = x @ W.T (+ b), x [M <= SMALL_LINEAR_MAX_ROWS, K] ----
//
// At decode time a CPU step multiplies a handful of rows (one per sequence, or the k + 1 tokens
// of a speculative verification) by every weight matrix of the model, which is read from memory
// once per step. BLAS handles one row as a matrix-vector product, streaming the weight once, but
// from two rows on it runs its general kernel, which packs the weight first: on the demo model a
// verification forward over 5 tokens took 1.4x one over a single token. Here each weight row is
// loaded once into registers and multiplied with every row of x (all in L1), so 2 to 8 rows cost
// about what one does.
//
// Each output is the same sum in the same order (VW-wide partial sums over K, then a tree over the
// lanes) whatever M is: a sequence's logits do not depend on how many rows share its step, so
// verifying k drafts scores each position exactly as a plain decode step would.

// Built without fast-math whatever the extension's flags: reassociating the FMA chains (which it
// allows) could differ between the M instantiations, and a row's sum would then depend on M.
TANDEM_PRECISE_BEGIN

namespace {

#if defined(__AVX512F__)
constexpr int64_t VW = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
#elif defined(TANDEM_AVX2)
constexpr int64_t VW = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
#else
constexpr int64_t VW = 0;  // no vector unit we know: the Python side keeps torch's linear
#endif

#if defined(__AVX512F__) || defined(TANDEM_AVX2)
// R (1 or 2) weight rows from row n against all M rows of x: R x M accumulators (M <= 8) stay in
// registers, and each weight vector is loaded once for all M rows.
template <int M, int R>
inline void weight_rows(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K, int64_t n) {
  vec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = vzero();
  for (int64_t k = 0; k < K; k += VW) {
    vec v[R];
    for (int r = 0; r < R; ++r) v[r] = vload(w + (n + r) * K + k);
    for (int m = 0; m < M; ++m) {
      const vec xv = vload(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = vfma(xv, v[r], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * N + n + r] = vsum(acc[r][m]) + (b ? b[n + r] : 0.f);
}

template <int M>
void small_linear_rows(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K,
                       int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 2 <= n_end; n += 2) weight_rows<M, 2>(x, w, b, y, N, K, n);
  if (n < n_end) weight_rows<M, 1>(x, w, b, y, N, K, n);
}

template <int M>
void small_linear_m(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K) {
  // whole pairs of weight rows per task, so that a row's sum never depends on the split
  at::parallel_for(0, (N + 1) / 2, 128, [&](int64_t begin, int64_t end) {
    small_linear_rows<M>(x, w, b, y, N, K, 2 * begin, std::min(2 * end, N));
  });
}
#endif

}  // namespace

TANDEM_PRECISE_END

constexpr int64_t SMALL_LINEAR_MAX_ROWS = 8;

// The vector width the kernel runs at (K must be a multiple of it); 0: not built for this CPU.
int64_t small_linear_width() { return VW; }

// x: [M, K] float32 (0 <= M <= 8), weight: [N, K] float32, bias: [N] float32 or empty -> [M, N].
torch::Tensor small_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias) {
  TORCH_CHECK(VW > 0, "small_linear: not built for this CPU");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.is_contiguous() && weight.is_contiguous() &&
              x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32 &&
              x.size(1) == weight.size(1), "small_linear: contiguous float32 x [M, K] and weight [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M <= SMALL_LINEAR_MAX_ROWS && K % (VW > 0 ? VW : 1) == 0,
              "small_linear: at most ", SMALL_LINEAR_MAX_ROWS, " rows and K a multiple of ", VW);
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == N),
              "small_linear: a float32 bias of N elements");
  auto y = torch::empty({M, N}, x.options());
#if defined(__AVX512F__) || defined(TANDEM_AVX2)
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  switch (M) {
    case 0: break;
    case 1: small_linear_m<1>(xp, wp, bp, yp, N, K); break;
    case 2: small_linear_m<2>(xp, wp, bp, yp, N, K); break;
    case 3: small_linear_m<3>(xp, wp, bp, yp, N, K); break;
    case 4: small_linear_m<4>(xp, wp, bp, yp, N, K); break;
    case 5: small_linear_m<5>(xp, wp, bp, yp, N, K); break;
    case 6: small_linear_m<6>(xp, wp, bp, yp, N, K); break;
    case 7: small_linear_m<7>(xp, wp, bp, yp, N, K); break;
    default: small_linear_m<8>(xp, wp, bp, yp, N, K); break;
  }
#endif
  return y;
}
