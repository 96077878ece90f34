// CPU kernels of hpc_rlhf._C (torch tensors in, torch tensors out) and their shared helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// Hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time
// (GCC function multiversioning), so the wheel stays portable without -march=native.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HPC_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HPC_SIMD_CLONES
#endif

namespace hpc_rlhf {

// Below this many elements an op runs on one thread: an OpenMP fork/join costs more than the
// work, and much more when the cores are oversubscribed.
constexpr int64_t kParallelMinWork = int64_t{1} << 16;

// exp(x) in fp32 (about 1 ulp; 0 below -87, inf above 88.7), written with plain float/int
// arithmetic so that `#pragma omp simd` loops calling it vectorise.
static inline __attribute__((always_inline)) float fast_exp(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: round to int
  const float n = shifted - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n * ln2 (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, 4);
  const uint32_t scale_bits = (bits + 127u) << 23;  // 2^n: low mantissa bits of `shifted` hold n
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  const float y = x > 88.72f ? std::numeric_limits<float>::infinity() : p * scale;
  return x < -87.0f ? 0.0f : y;
}

// bf16 storage with fp32 math: a bf16 value is held as its 16 bits (uint16_t) and widened
// or rounded (to nearest even; NaN stays a quiet NaN) with integer ops, so that templated
// `#pragma omp simd` loops over float or bf16 rows vectorise alike.
static inline __attribute__((always_inline)) float load_f32(float x) { return x; }
static inline __attribute__((always_inline)) float load_f32(uint16_t h) {
  const uint32_t bits = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
static inline __attribute__((always_inline)) void store_f32(float& out, float x) { out = x; }
static inline __attribute__((always_inline)) void store_f32(uint16_t& out, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  out = x != x ? uint16_t{0x7FC0} : uint16_t(bits >> 16);
}

// The element pointer of an fp32 (float) or bf16 (uint16_t bits) tensor.
template <typename T>
inline T* elements(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Call f(float{}) for an fp32 tensor and f(uint16_t{}) for a bf16 one (the element type
// the kernel's rows are instantiated for); anything else is refused, naming `op`.
template <typename F>
inline auto dispatch_fp32_bf16(const at::Tensor& t, const char* op, F&& f) {
  if (t.scalar_type() == at::kBFloat16) return f(uint16_t{});
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, " (cpp): expected an fp32 or bf16 tensor, got ",
              t.scalar_type());
  return f(float{});
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, bool entropy);

at::Tensor logprobs_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                            int64_t vocab_start, const at::Tensor& m,
                            const at::Tensor& log_s,
                            const std::optional<at::Tensor>& ent, const at::Tensor& g_lp,
                            const std::optional<at::Tensor>& g_ent);

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam);

std::tuple<at::Tensor, at::Tensor> ppo_rows_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                const at::Tensor& adv, const at::Tensor& mask,
                                                double clip_low, double clip_high,
                                                double dual_clip, bool need_grad);

std::tuple<at::Tensor, at::Tensor> value_rows_cpu(const at::Tensor& values,
                                                  const at::Tensor& old_values,
                                                  const at::Tensor& returns,
                                                  const at::Tensor& mask, double clip,
                                                  bool need_grad);

at::Tensor swiglu_fwd_cpu(const at::Tensor& x);

at::Tensor swiglu_bwd_cpu(const at::Tensor& x, const at::Tensor& grad_out);

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_pool,
                                      const at::Tensor& v_pool, const at::Tensor& block_table,
                                      const at::Tensor& context_lens, double scale);

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_cpu(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const at::Tensor& cu_seqlens,
                                                            double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out, const at::Tensor& cu_seqlens,
    double scale);

std::tuple<at::Tensor, at::Tensor> rmsnorm_fwd_cpu(const at::Tensor& x, const at::Tensor& w,
                                                   double eps);

std::tuple<at::Tensor, at::Tensor> rmsnorm_bwd_cpu(const at::Tensor& x, const at::Tensor& w,
                                                   const at::Tensor& rstd,
                                                   const at::Tensor& grad_out);

at::Tensor rope_cpu(const at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin,
                    const at::Tensor& pos, bool transpose);

}  // namespace hpc_rlhf
