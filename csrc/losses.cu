// PPO policy loss and value loss on CUDA: one block per sequence; each thread walks its
// strided tokens, writes the per-token derivative and keeps partial sums that the block
// reduces with warp shuffles into rows [B, K] (see hpc_rlhf/ops/ppo_loss.py, value_loss.py).
#include "cuda_common.cuh"

namespace hpc_rlhf_cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) ppo_rows_kernel(
    const float* __restrict__ logp, const float* __restrict__ old_logp,
    const float* __restrict__ adv, const uint8_t* __restrict__ mask, int64_t steps, float lo,
    float hi, float dual, float* __restrict__ rows, float* __restrict__ dcoef) {
  __shared__ float smem[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * steps;
  float acc[7] = {0, 0, 0, 0, 0, 0, 0};  // loss, n, clipped, kl, ratio, ratio max, dual
  for (int64_t t = base + threadIdx.x; t < base + steps; t += kThreads) {
    float d = 0.0f;
    if (mask[t]) {
      const float a = adv[t], ratio = expf(logp[t] - old_logp[t]);
      const float unclipped = ratio * a, clipped_term = fminf(fmaxf(ratio, lo), hi) * a;
      const bool clipped = clipped_term < unclipped;
      float l = -fminf(unclipped, clipped_term);
      d = clipped ? 0.0f : -ratio * a;
      if (dual > 0.0f && a < 0.0f && l > -dual * a) {
        l = -dual * a;
        d = 0.0f;
        acc[6] += 1.0f;
      }
      acc[0] += l;
      acc[1] += 1.0f;
      acc[2] += clipped ? 1.0f : 0.0f;
      acc[3] += old_logp[t] - logp[t];
      acc[4] += ratio;
      acc[5] = fmaxf(acc[5], ratio);
    }
    if (dcoef != nullptr) dcoef[t] = d;
  }
#pragma unroll
  for (int k = 0; k < 7; ++k) {
    const float v = k == 5 ? block_reduce<true>(acc[k], smem) : block_reduce<false>(acc[k], smem);
    if (threadIdx.x == 0) rows[blockIdx.x * 7 + k] = v;
  }
}

__global__ void __launch_bounds__(kThreads) value_rows_kernel(
    const float* __restrict__ values, const float* __restrict__ old_values,
    const float* __restrict__ returns, const uint8_t* __restrict__ mask, int64_t steps,
    float clip, float* __restrict__ rows, float* __restrict__ dcoef) {
  __shared__ float smem[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * steps;
  float acc[5] = {0, 0, 0, 0, 0};  // loss, n, clipped, value sum, squared error
  for (int64_t t = base + threadIdx.x; t < base + steps; t += kThreads) {
    float d = 0.0f;
    if (mask[t]) {
      const float v = values[t], err = v - returns[t], sq = err * err;
      float sq_clip = sq;
      if (clip >= 0.0f) {
        const float vc = fminf(fmaxf(v, old_values[t] - clip), old_values[t] + clip);
        sq_clip = (vc - returns[t]) * (vc - returns[t]);
      }
      const bool clipped = sq_clip > sq;
      d = clipped ? 0.0f : err;
      acc[0] += 0.5f * fmaxf(sq, sq_clip);
      acc[1] += 1.0f;
      acc[2] += clipped ? 1.0f : 0.0f;
      acc[3] += v;
      acc[4] += sq;
    }
    if (dcoef != nullptr) dcoef[t] = d;
  }
#pragma unroll
  for (int k = 0; k < 5; ++k) {
    const float v = block_reduce<false>(acc[k], smem);
    if (threadIdx.x == 0) rows[blockIdx.x * 5 + k] = v;
  }
}

}  // namespace
}  // namespace hpc_rlhf_cuda

extern "C" int hpc_ppo_rows_cuda(const float* logp, const float* old_logp, const float* adv,
                                 const uint8_t* mask, int64_t batch, int64_t steps,
                                 float clip_low, float clip_high, float dual_clip, float* rows,
                                 float* dcoef, void* stream) {
  using namespace hpc_rlhf_cuda;
  if (batch == 0) return 0;
  ppo_rows_kernel<<<batch, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      logp, old_logp, adv, mask, steps, 1.0f - clip_low, 1.0f + clip_high, dual_clip, rows, dcoef);
  return launch_status();
}

extern "C" int hpc_value_rows_cuda(const float* values, const float* old_values,
                                   const float* returns, const uint8_t* mask, int64_t batch,
                                   int64_t steps, float clip, float* rows, float* dcoef,
                                   void* stream) {
  using namespace hpc_rlhf_cuda;
  if (batch == 0) return 0;
  value_rows_kernel<<<batch, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      values, old_values, returns, mask, steps, clip, rows, dcoef);
  return launch_status();
}
