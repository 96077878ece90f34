// SwiGLU on CPU: out = silu(a) * b for each row x = [a | b], and its gradient, one pass each
// over the row (the unfused version makes five passes and three [.., F] temporaries). fp32
// or bf16 storage (x, grad_out and the results alike), fp32 math.
#include "cpu_ops.h"

namespace hpc_rlhf {
namespace {

template <typename T>
HPC_SIMD_CLONES void swiglu_fwd_row(const T* a, const T* b, T* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float aj = load_f32(a[j]);
    const float s = 1.0f / (1.0f + fast_exp(-aj));  // sigmoid(a)
    store_f32(out[j], aj * s * load_f32(b[j]));
  }
}

// d/da silu(a) * b = b * s * (1 + a * (1 - s)),  d/db = silu(a)
template <typename T>
HPC_SIMD_CLONES void swiglu_bwd_row(const T* a, const T* b, const T* g, T* da, T* db, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float aj = load_f32(a[j]), gj = load_f32(g[j]);
    const float s = 1.0f / (1.0f + fast_exp(-aj));
    store_f32(db[j], gj * aj * s);
    store_f32(da[j], gj * load_f32(b[j]) * s * (1.0f + aj * (1.0f - s)));
  }
}

void check_input(const at::Tensor& x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "swiglu: last dim of x must be even");
}

}  // namespace

at::Tensor swiglu_fwd_cpu(const at::Tensor& x) {
  check_input(x);
  const int64_t n = x.size(-1) / 2, rows = n ? x.numel() / (2 * n) : 0;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, x.options());
  dispatch_fp32_bf16(x, "swiglu", [&](auto zero) {
    using T = decltype(zero);
    const T* xp = elements<const T>(x);
    T* op = elements<T>(out);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) \
    if (rows * n >= kParallelMinWork)
    for (int64_t r = 0; r < rows; ++r) {
      swiglu_fwd_row(xp + r * 2 * n, xp + r * 2 * n + n, op + r * n, n);
    }
  });
  return out;
}

at::Tensor swiglu_bwd_cpu(const at::Tensor& x, const at::Tensor& grad_out) {
  check_input(x);
  check_cpu(grad_out, "grad_out");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "swiglu (cpp): grad_out must be in x's dtype");
  const int64_t n = x.size(-1) / 2, rows = n ? x.numel() / (2 * n) : 0;
  TORCH_CHECK(grad_out.numel() == rows * n, "swiglu: grad_out must have x's rows of F values");
  at::Tensor dx = at::empty_like(x);
  dispatch_fp32_bf16(x, "swiglu", [&](auto zero) {
    using T = decltype(zero);
    const T* xp = elements<const T>(x);
    const T* gp = elements<const T>(grad_out);
    T* dp = elements<T>(dx);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) \
    if (rows * n >= kParallelMinWork)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = xp + r * 2 * n;
      swiglu_bwd_row(xr, xr + n, gp + r * n, dp + r * 2 * n, dp + r * 2 * n + n, n);
    }
  });
  return dx;
}

}  // namespace hpc_rlhf
