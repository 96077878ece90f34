// Masked GAE on CPU: a reverse scan per sequence, sequences split over OpenMP threads.
#include "cpu_ops.h"

namespace hpc_rlhf {

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  check_cpu(rewards, "rewards");
  check_cpu(values, "values");
  check_cpu(mask, "mask");
  TORCH_CHECK(rewards.dim() == 2 && values.sizes() == rewards.sizes() &&
                  mask.sizes() == rewards.sizes(),
              "rewards, values, mask must be [B, T]");
  TORCH_CHECK(rewards.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "rewards and values must be fp32");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "mask must be uint8");
  const int64_t batch = rewards.size(0), steps = rewards.size(1);
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  const float* r = rewards.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  const uint8_t* m = mask.data_ptr<uint8_t>();
  float* a_out = adv.data_ptr<float>();
  float* r_out = ret.data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
#pragma omp parallel for schedule(dynamic, 4) num_threads(at::get_num_threads()) \
    if (batch * steps >= kParallelMinWork)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t o = b * steps;
    float next_v = 0.0f, next_a = 0.0f;
    for (int64_t t = steps - 1; t >= 0; --t) {
      if (m[o + t]) {
        const float a = r[o + t] + g * next_v - v[o + t] + gl * next_a;
        a_out[o + t] = a;
        r_out[o + t] = a + v[o + t];
        next_v = v[o + t];
        next_a = a;
      } else {
        a_out[o + t] = 0.0f;
        r_out[o + t] = 0.0f;
      }
    }
  }
  return {adv, ret};
}

}  // namespace hpc_rlhf
