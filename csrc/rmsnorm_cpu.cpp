// RMSNorm on CPU: y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) per row, and its
// gradient, one pass per row each way (torch's CPU backward runs the formula as a chain of
// element-wise ops, each a pass over [rows, H] with its own temporary). fp32 or bf16
// storage for x, w, y and the gradients; fp32 math; rstd [rows] is kept in fp32.
#include "cpu_ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hpc_rlhf {
namespace {

inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <typename T>
HPC_SIMD_CLONES float rmsnorm_fwd_row(const T* x, const T* w, T* y, int64_t n, float eps) {
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < n; ++j) {
    const float xj = load_f32(x[j]);
    sq += xj * xj;
  }
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) store_f32(y[j], load_f32(x[j]) * rstd * load_f32(w[j]));
  return rstd;
}

// xhat = x * rstd, g = dy * w: dx = rstd * (g - xhat * mean(g * xhat)); dw += dy * xhat
template <typename T>
HPC_SIMD_CLONES void rmsnorm_bwd_row(const T* x, const T* w, const T* dy, float rstd, T* dx,
                                     float* dw, int64_t n) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) {
    const float xhat = load_f32(x[j]) * rstd, dyj = load_f32(dy[j]);
    dot += dyj * load_f32(w[j]) * xhat;
    dw[j] += dyj * xhat;
  }
  const float mean = dot / static_cast<float>(n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float xhat = load_f32(x[j]) * rstd;
    store_f32(dx[j], rstd * (load_f32(dy[j]) * load_f32(w[j]) - xhat * mean));
  }
}

int64_t check_inputs(const at::Tensor& x, const at::Tensor& w) {
  check_cpu(x, "rmsnorm: x");
  check_cpu(w, "rmsnorm: weight");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1),
              "rmsnorm (cpp): weight must be [H] for x [..., H]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rmsnorm (cpp): weight must be in x's dtype");
  return x.size(-1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rmsnorm_fwd_cpu(const at::Tensor& x, const at::Tensor& w,
                                                   double eps) {
  const int64_t n = check_inputs(x, w), rows = n ? x.numel() / n : 0;
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  dispatch_fp32_bf16(x, "rmsnorm", [&](auto zero) {
    using T = decltype(zero);
    const T *xp = elements<const T>(x), *wp = elements<const T>(w);
    T* yp = elements<T>(y);
    float* rp = rstd.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) \
    if (rows * n >= kParallelMinWork)
    for (int64_t r = 0; r < rows; ++r) {
      rp[r] = rmsnorm_fwd_row(xp + r * n, wp, yp + r * n, n, static_cast<float>(eps));
    }
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_bwd_cpu(const at::Tensor& x, const at::Tensor& w,
                                                   const at::Tensor& rstd,
                                                   const at::Tensor& grad_out) {
  const int64_t n = check_inputs(x, w), rows = n ? x.numel() / n : 0;
  check_cpu(grad_out, "rmsnorm: grad_out");
  check_cpu(rstd, "rmsnorm: rstd");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "rmsnorm (cpp): grad_out must be x's shape and dtype");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows,
              "rmsnorm (cpp): rstd must be the forward's fp32 [rows]");
  at::Tensor dx = at::empty_like(x);
  const int threads = (rows * n >= kParallelMinWork) ? at::get_num_threads() : 1;
  at::Tensor dw_parts = at::zeros({threads, n}, x.options().dtype(at::kFloat));
  dispatch_fp32_bf16(x, "rmsnorm", [&](auto zero) {
    using T = decltype(zero);
    const T *xp = elements<const T>(x), *wp = elements<const T>(w);
    const T* gp = elements<const T>(grad_out);
    T* dp = elements<T>(dx);
    const float* rp = rstd.data_ptr<float>();
    float* parts = dw_parts.data_ptr<float>();
#pragma omp parallel num_threads(threads)
    {
      float* dw = parts + static_cast<int64_t>(thread_index()) * n;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        rmsnorm_bwd_row(xp + r * n, wp, gp + r * n, rp[r], dp + r * n, dw, n);
      }
    }
  });
  return {dx, dw_parts.sum(0).to(x.scalar_type())};
}

}  // namespace hpc_rlhf
