// Rotate-half rotary position embedding on CPU, one pass over the rows (megatron-core's
// unfused version makes five: two products, a negation, a concatenation and a sum, and as
// many again backward).
//
// out[d] = t[d] cos[p, d] + rot(t)[d] sin[p, d], rot(t) = [-t[h:], t[:h]] (h = D / 2), with
// p = pos[s] the position of sequence index s. The transpose (the gradient) is
// g[j] cos[p, j] + g[j + h] sin[p, j + h] for j < h and g[j] cos[p, j] - g[j - h] sin[p, j - h]
// above. t and the result are fp32 or bf16 (fp32 math, fp32 tables).
#include "cpu_ops.h"

namespace hpc_rlhf {
namespace {

template <typename T>
HPC_SIMD_CLONES void rope_row(const T* x, const float* c, const float* s, int64_t half,
                              bool transpose, T* out) {
  const float sign = transpose ? -1.0f : 1.0f;
  // transpose: the sin factor comes from the partner's column, with the opposite sign
  const float* s_lo = transpose ? s + half : s;
  const float* s_hi = transpose ? s : s + half;
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    const float lo = load_f32(x[j]), hi = load_f32(x[j + half]);
    store_f32(out[j], lo * c[j] - sign * hi * s_lo[j]);
    store_f32(out[j + half], hi * c[j + half] + sign * lo * s_hi[j]);
  }
}

}  // namespace

at::Tensor rope_cpu(const at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin,
                    const at::Tensor& pos, bool transpose) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.stride(3) == 1,
              "rope (cpp): t must be a CPU tensor [S, B, H, D] with a contiguous last dim");
  check_cpu(cos, "cos");
  check_cpu(sin, "sin");
  check_cpu(pos, "pos");
  const int64_t S = t.size(0), B = t.size(1), H = t.size(2), D = t.size(3);
  TORCH_CHECK(D % 2 == 0, "rope (cpp): head dim ", D, " must be even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == D,
              "rope (cpp): cos and sin must be fp32 [P, D]");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == S,
              "rope (cpp): pos must be int64 [S]");
  const int64_t P = cos.size(0);
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < S; ++i) {
    TORCH_CHECK(pp[i] >= 0 && pp[i] < P, "rope (cpp): position ", pp[i], " outside the ", P,
                "-row table");
  }
  at::Tensor out = at::empty({S, B, H, D}, t.options());
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t rows = S * B * H, st0 = t.stride(0), st1 = t.stride(1), st2 = t.stride(2);
  dispatch_fp32_bf16(t, "rope", [&](auto zero) {
    using T = decltype(zero);
    const T* tp = elements<const T>(t);
    T* op = elements<T>(out);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) \
    if (rows * D >= kParallelMinWork)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t s = r / (B * H), b = (r / H) % B, h = r % H;
      rope_row(tp + s * st0 + b * st1 + h * st2, cp + pp[s] * D, sp + pp[s] * D, D / 2,
               transpose, op + r * D);
    }
  });
  return out;
}

}  // namespace hpc_rlhf
