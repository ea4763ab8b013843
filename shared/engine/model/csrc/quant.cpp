// ---- weight-only int8 linear: y = x @ (q * scale[:, None]).T ----
//
// The weight stays int8 in memory. Each task takes a tile of output channels whose
// dequantized rows take ~2 MiB (they stay in cache), converts them into a scratch tile of x's dtype (the
// scale folded in), and multiplies x [M, K] by its transpose with the BLAS/oneDNN matmul. The tile is
// rewritten in place for the next channels, so a full-precision weight never exists and the
// weight's bytes come from memory once per call, at one byte each.

namespace {

inline uint16_t bf16_bits(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
void dequant_rows(const int8_t* q, const float* s, T* out, int64_t n, int64_t K);

#if defined(__AVX512F__) && defined(__AVX512BW__)
// sixteen int8 -> float32 times the row's scale
inline __m512 i8x16(const int8_t* p, __m512 sc) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))), sc);
}
#endif

template <>
void dequant_rows<float>(const int8_t* q, const float* s, float* out, int64_t n, int64_t K) {
  for (int64_t r = 0; r < n; ++r) {
    const float sc = s[r];
    const int8_t* qr = q + r * K;
    float* o = out + r * K;
    int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 vs = _mm512_set1_ps(sc);
    for (; k + 16 <= K; k += 16) _mm512_storeu_ps(o + k, i8x16(qr + k, vs));
#endif
    for (; k < K; ++k) o[k] = static_cast<float>(qr[k]) * sc;
  }
}

template <>
void dequant_rows<at::BFloat16>(const int8_t* q, const float* s, at::BFloat16* out, int64_t n, int64_t K) {
  uint16_t* o16 = reinterpret_cast<uint16_t*>(out);
  for (int64_t r = 0; r < n; ++r) {
    const float sc = s[r];
    const int8_t* qr = q + r * K;
    uint16_t* o = o16 + r * K;
    int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 vs = _mm512_set1_ps(sc);
    for (; k + 16 <= K; k += 16) {
      // round to nearest even into the top 16 bits, as bf16_bits does
      const __m512i u = _mm512_castps_si512(i8x16(qr + k, vs));
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i r16 = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), _mm512_cvtepi32_epi16(r16));
    }
#endif
    for (; k < K; ++k) o[k] = bf16_bits(static_cast<float>(qr[k]) * sc);
  }
}

template <>
void dequant_rows<at::Half>(const int8_t* q, const float* s, at::Half* out, int64_t n, int64_t K) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t k = 0; k < K; ++k) out[r * K + k] = static_cast<at::Half>(static_cast<float>(q[r * K + k]) * s[r]);
}

template <typename T>
void int8_linear_tiles(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                       torch::Tensor& out, int64_t tile) {
  const int64_t N = q.size(0), K = q.size(1), ntiles = (N + tile - 1) / tile;
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    torch::Tensor w = torch::empty({tile, K}, x.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * tile, n = std::min(tile, N - n0);
      dequant_rows<T>(qp + n0 * K, sp + n0, w.data_ptr<T>(), n, K);
      // x [M, K] times the tile's transpose: the shape of F.linear, which takes oneDNN's fast path
      out.narrow(1, n0, n).copy_(at::linear(x, w.narrow(0, 0, n)));
    }
  });
}

}  // namespace

// x: [M, K] float32 / bfloat16 / float16, q: [N, K] int8, scale: [N] float32 -> [M, N] in x's dtype.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && q.dim() == 2 && q.is_contiguous() &&
              q.scalar_type() == torch::kInt8 && q.size(1) == x.size(1),
              "int8_linear: x [M, K] and int8 weight [N, K], contiguous");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == q.size(0),
              "int8_linear: one float32 scale per output channel");
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0);
  const int64_t elem = x.element_size();
  // ~2 MiB of dequantized rows a tile: small enough to stay in cache, large enough that the
  // matmul's per-call cost (measured: 64-row tiles double the time of a 2048-wide projection) is small
  const int64_t tile = std::max<int64_t>(64, std::min<int64_t>(4096, (2 << 20) / (K * elem)) / 16 * 16);
  auto out = torch::empty({M, N}, x.options());
  switch (x.scalar_type()) {
    case torch::kFloat32: int8_linear_tiles<float>(x, q, scale, out, tile); break;
    case torch::kBFloat16: int8_linear_tiles<at::BFloat16>(x, q, scale, out, tile); break;
    case torch::kFloat16: int8_linear_tiles<at::Half>(x, q, scale, out, tile); break;
    default: TORCH_CHECK(false, "int8_linear: unsupported dtype ", x.scalar_type());
  }
  return out;
}
