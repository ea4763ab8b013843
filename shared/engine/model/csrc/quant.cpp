// ---- int8 linear: y = x @ (q * scale[:, None]).T with the weight q in int8 ----
//
// Each row of x is quantized to int8 with its own scale (symmetric, amax / 127), the int8 x int8
// product runs in int32 (oneDNN, on the CPU's VNNI dot-product instructions: twice the
// multiply-adds per instruction of bf16's), and the result is scaled back by row and channel.
// One call from Python: the quantization and the scaling are plain loops here, because at decode
// batch sizes the per-op dispatch of the same steps as torch ops costs as much as the matmul.
// `quant.quantize_rows` / `quant._int8_rows_mm` are the same arithmetic in torch ops (the tests
// compare them).

namespace {

// 1 / s by an exact IEEE division, whatever the build's -ffast-math (with it the compiler may
// compute a reciprocal approximately, and an activation exactly between two steps, common with
// bfloat16 inputs, then rounds the other way than in quant.quantize_rows). Not inlined, so the
// fast-math loop that uses it cannot rewrite it.
TANDEM_PRECISE_BEGIN
__attribute__((noinline)) float exact_reciprocal(float s) { return 1.f / s; }
TANDEM_PRECISE_END

template <typename T>
void quantize_rows_into(const T* x, int8_t* xq, float* xs, int64_t M, int64_t K) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* r = x + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(static_cast<float>(r[k])));
      // a product with the float32 reciprocal of 127, as quant.quantize_rows computes it
      const float s = std::max(amax * (1.f / 127.f), 1e-12f), inv = exact_reciprocal(s);
      xs[m] = s;
      int8_t* o = xq + m * K;
      for (int64_t k = 0; k < K; ++k)
        o[k] = static_cast<int8_t>(std::min(std::max(std::nearbyint(static_cast<float>(r[k]) * inv), -127.f), 127.f));
    }
  });
}

template <typename T>
void scale_out(const int32_t* acc, const float* xs, const float* ws, T* out, int64_t M, int64_t N) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float s = xs[m];
      for (int64_t n = 0; n < N; ++n) out[m * N + n] = static_cast<T>(static_cast<float>(acc[m * N + n]) * s * ws[n]);
    }
  });
}

template <typename T>
torch::Tensor int8_linear_t(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto xs = torch::empty({M}, x.options().dtype(torch::kFloat32));
  quantize_rows_into<T>(x.data_ptr<T>(), xq.data_ptr<int8_t>(), xs.data_ptr<float>(), M, K);
  const auto acc = at::_int_mm(xq, q.t()).contiguous();
  auto out = torch::empty({M, N}, x.options());
  scale_out<T>(acc.data_ptr<int32_t>(), xs.data_ptr<float>(), scale.data_ptr<float>(), out.data_ptr<T>(), M, N);
  return out;
}

}  // namespace

// x: [M, K] float32 / bfloat16 / float16, q: [N, K] int8, scale: [N] float32 -> [M, N] in x's dtype.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && q.dim() == 2 && q.is_contiguous() &&
              q.scalar_type() == torch::kInt8 && q.size(1) == x.size(1),
              "int8_linear: x [M, K] and int8 weight [N, K], contiguous");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == q.size(0),
              "int8_linear: one float32 scale per output channel");
  switch (x.scalar_type()) {
    case torch::kFloat32: return int8_linear_t<float>(x, q, scale);
    case torch::kBFloat16: return int8_linear_t<at::BFloat16>(x, q, scale);
    case torch::kFloat16: return int8_linear_t<at::Half>(x, q, scale);
    default: TORCH_CHECK(false, "int8_linear: unsupported dtype ", x.scalar_type());
  }
}
