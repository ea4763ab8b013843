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
