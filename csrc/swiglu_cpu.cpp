// SwiGLU on CPU: out = silu(a) * b for each row x = [a | b], and its gradient, one pass each
// over the row (the unfused version makes five passes and three [.., F] temporaries).
#include "cpu_ops.h"

namespace hpc_rlhf {
namespace {

HPC_SIMD_CLONES void swiglu_fwd_row(const float* a, const float* b, float* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float s = 1.0f / (1.0f + fast_exp(-a[j]));  // sigmoid(a)
    out[j] = a[j] * s * b[j];
  }
}

// d/da silu(a) * b = b * s * (1 + a * (1 - s)),  d/db = silu(a)
HPC_SIMD_CLONES void swiglu_bwd_row(const float* a, const float* b, const float* g, float* da,
                                    float* db, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float s = 1.0f / (1.0f + fast_exp(-a[j]));
    db[j] = g[j] * a[j] * s;
    da[j] = g[j] * b[j] * s * (1.0f + a[j] * (1.0f - s));
  }
}

void check_input(const at::Tensor& x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "swiglu (cpp): x must be fp32");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "swiglu: last dim of x must be even");
}

}  // namespace

at::Tensor swiglu_fwd_cpu(const at::Tensor& x) {
  check_input(x);
  const int64_t n = x.size(-1) / 2, rows = n ? x.numel() / (2 * n) : 0;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) \
    if (rows * n >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    swiglu_fwd_row(xp + r * 2 * n, xp + r * 2 * n + n, op + r * n, n);
  }
  return out;
}

at::Tensor swiglu_bwd_cpu(const at::Tensor& x, const at::Tensor& grad_out) {
  check_input(x);
  check_cpu(grad_out, "grad_out");
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat, "swiglu (cpp): grad_out must be fp32");
  const int64_t n = x.size(-1) / 2, rows = n ? x.numel() / (2 * n) : 0;
  TORCH_CHECK(grad_out.numel() == rows * n, "swiglu: grad_out must have x's rows of F values");
  at::Tensor dx = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* gp = grad_out.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) \
    if (rows * n >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * 2 * n;
    swiglu_bwd_row(xr, xr + n, gp + r * n, dp + r * 2 * n, dp + r * 2 * n + n, n);
  }
  return dx;
}

}  // namespace hpc_rlhf
