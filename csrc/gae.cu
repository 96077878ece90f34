// Masked GAE on CUDA: a reverse scan parallel over sequences. One warp owns 32 sequences;
// it walks time backwards in 32-step tiles that it loads coalesced into shared memory
// (transposed), then each lane scans its own sequence through the tile.
#include "cuda_common.cuh"

namespace hpc_rlhf_cuda {
namespace {

constexpr int kTile = 32;

__global__ void __launch_bounds__(kTile) gae_kernel(const float* __restrict__ rewards,
                                                    const float* __restrict__ values,
                                                    const uint8_t* __restrict__ mask,
                                                    int64_t batch, int64_t steps, float gamma,
                                                    float gamma_lam, float* __restrict__ adv,
                                                    float* __restrict__ ret) {
  __shared__ float r_s[kTile][kTile + 1], v_s[kTile][kTile + 1];
  __shared__ float a_s[kTile][kTile + 1], ret_s[kTile][kTile + 1];
  __shared__ uint8_t m_s[kTile][kTile + 1];
  const int lane = threadIdx.x;
  const int64_t seq0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float next_v = 0.0f, next_a = 0.0f;
  const int64_t n_tiles = (steps + kTile - 1) / kTile;
  for (int64_t tile = n_tiles - 1; tile >= 0; --tile) {
    const int64_t t0 = tile * kTile, t = t0 + lane;
    for (int j = 0; j < kTile; ++j) {  // row j of the tile: coalesced along time
      const int64_t b = seq0 + j;
      const bool in = b < batch && t < steps;
      r_s[j][lane] = in ? rewards[b * steps + t] : 0.0f;
      v_s[j][lane] = in ? values[b * steps + t] : 0.0f;
      m_s[j][lane] = in ? mask[b * steps + t] : 0;
    }
    __syncwarp();
    for (int k = kTile - 1; k >= 0; --k) {  // lane scans its own sequence
      float a = 0.0f, out_ret = 0.0f;
      if (m_s[lane][k]) {
        const float v = v_s[lane][k];
        a = r_s[lane][k] + gamma * next_v - v + gamma_lam * next_a;
        out_ret = a + v;
        next_v = v;
        next_a = a;
      }
      a_s[lane][k] = a;
      ret_s[lane][k] = out_ret;
    }
    __syncwarp();
    for (int j = 0; j < kTile; ++j) {
      const int64_t b = seq0 + j;
      if (b < batch && t < steps) {
        adv[b * steps + t] = a_s[j][lane];
        ret[b * steps + t] = ret_s[j][lane];
      }
    }
    __syncwarp();
  }
}

}  // namespace
}  // namespace hpc_rlhf_cuda

extern "C" int hpc_gae_cuda(const float* rewards, const float* values, const uint8_t* mask,
                            int64_t batch, int64_t steps, float gamma, float lam, float* adv,
                            float* ret, void* stream) {
  using namespace hpc_rlhf_cuda;
  if (batch == 0 || steps == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((batch + kTile - 1) / kTile);
  gae_kernel<<<blocks, kTile, 0, static_cast<cudaStream_t>(stream)>>>(
      rewards, values, mask, batch, steps, gamma, gamma * lam, adv, ret);
  return launch_status();
}
