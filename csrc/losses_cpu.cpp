// PPO policy loss and value loss on CPU: per-row partial sums and the per-token derivative
// of the unreduced loss in one pass; rows split over OpenMP threads. The reduction over rows
// (token_mean / seq_mean) is done by hpc_rlhf/ops/_loss_common.py on [B, K] sums.
#include <algorithm>

#include "cpu_ops.h"

namespace hpc_rlhf {
namespace {

void check_rows_inputs(std::initializer_list<const at::Tensor*> floats, const at::Tensor& mask) {
  const auto sizes = mask.sizes();
  TORCH_CHECK(mask.dim() == 2, "mask must be [B, T]");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "mask must be uint8");
  check_cpu(mask, "mask");
  for (const at::Tensor* t : floats) {
    check_cpu(*t, "loss input");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == sizes, "inputs: fp32 [B, T]");
  }
}

}  // namespace

// rows [B, 7]: loss sum, count, clipped count, sum(old - logp), ratio sum, ratio max, dual count
std::tuple<at::Tensor, at::Tensor> ppo_rows_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                const at::Tensor& adv, const at::Tensor& mask,
                                                double clip_low, double clip_high,
                                                double dual_clip, bool need_grad) {
  check_rows_inputs({&logp, &old_logp, &adv}, mask);
  const int64_t batch = mask.size(0), steps = mask.size(1);
  at::Tensor rows = at::zeros({batch, 7}, logp.options());
  at::Tensor dcoef = need_grad ? at::empty_like(logp) : at::empty({0}, logp.options());
  const float *lp = logp.data_ptr<float>(), *old = old_logp.data_ptr<float>();
  const float* a = adv.data_ptr<float>();
  const uint8_t* m = mask.data_ptr<uint8_t>();
  float* out = rows.data_ptr<float>();
  float* dc = need_grad ? dcoef.data_ptr<float>() : nullptr;
  const float lo = 1.0f - static_cast<float>(clip_low), hi = 1.0f + static_cast<float>(clip_high);
  const float dual = static_cast<float>(dual_clip);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < batch; ++b) {
    float loss_sum = 0, count = 0, clipped_n = 0, kl = 0, ratio_sum = 0, ratio_max = 0, dual_n = 0;
    for (int64_t t = b * steps; t < (b + 1) * steps; ++t) {
      float d = 0.0f;
      if (m[t]) {
        const float ratio = std::exp(lp[t] - old[t]);
        const float unclipped = ratio * a[t];
        const float clipped_term = std::min(std::max(ratio, lo), hi) * a[t];
        const bool clipped = clipped_term < unclipped;
        float l = -std::min(unclipped, clipped_term);
        d = clipped ? 0.0f : -ratio * a[t];
        if (dual > 0.0f && a[t] < 0.0f && l > -dual * a[t]) {
          l = -dual * a[t];
          d = 0.0f;
          dual_n += 1.0f;
        }
        loss_sum += l;
        count += 1.0f;
        clipped_n += clipped ? 1.0f : 0.0f;
        kl += old[t] - lp[t];
        ratio_sum += ratio;
        ratio_max = std::max(ratio_max, ratio);
      }
      if (dc) dc[t] = d;
    }
    float* o = out + b * 7;
    o[0] = loss_sum, o[1] = count, o[2] = clipped_n, o[3] = kl, o[4] = ratio_sum;
    o[5] = ratio_max, o[6] = dual_n;
  }
  return {rows, dcoef};
}

// rows [B, 5]: loss sum, count, clipped count, value sum, squared-error sum
std::tuple<at::Tensor, at::Tensor> value_rows_cpu(const at::Tensor& values,
                                                  const at::Tensor& old_values,
                                                  const at::Tensor& returns,
                                                  const at::Tensor& mask, double clip,
                                                  bool need_grad) {
  check_rows_inputs({&values, &old_values, &returns}, mask);
  const int64_t batch = mask.size(0), steps = mask.size(1);
  at::Tensor rows = at::zeros({batch, 5}, values.options());
  at::Tensor dcoef = need_grad ? at::empty_like(values) : at::empty({0}, values.options());
  const float *v = values.data_ptr<float>(), *old = old_values.data_ptr<float>();
  const float* ret = returns.data_ptr<float>();
  const uint8_t* m = mask.data_ptr<uint8_t>();
  float* out = rows.data_ptr<float>();
  float* dc = need_grad ? dcoef.data_ptr<float>() : nullptr;
  const float c = static_cast<float>(clip);
  const bool use_clip = clip >= 0.0;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < batch; ++b) {
    float loss_sum = 0, count = 0, clipped_n = 0, v_sum = 0, sq_sum = 0;
#pragma omp simd reduction(+ : loss_sum, count, clipped_n, v_sum, sq_sum)
    for (int64_t t = b * steps; t < (b + 1) * steps; ++t) {
      const float err = v[t] - ret[t], sq = err * err;
      float sq_clip = sq;
      if (use_clip) {
        const float vc = std::min(std::max(v[t], old[t] - c), old[t] + c);
        sq_clip = (vc - ret[t]) * (vc - ret[t]);
      }
      const bool valid = m[t] != 0, clipped = sq_clip > sq;
      loss_sum += valid ? 0.5f * std::max(sq, sq_clip) : 0.0f;
      count += valid ? 1.0f : 0.0f;
      clipped_n += (valid && clipped) ? 1.0f : 0.0f;
      v_sum += valid ? v[t] : 0.0f;
      sq_sum += valid ? sq : 0.0f;
      if (dc) dc[t] = (valid && !clipped) ? err : 0.0f;
    }
    float* o = out + b * 5;
    o[0] = loss_sum, o[1] = count, o[2] = clipped_n, o[3] = v_sum, o[4] = sq_sum;
  }
  return {rows, dcoef};
}

}  // namespace hpc_rlhf
