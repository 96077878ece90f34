// PPO policy loss and value loss on CPU: per-row partial sums and the per-token derivative
// of the unreduced loss in one branch-free (vectorised) pass per row; rows are split over
// OpenMP threads. The reduction over rows (token_mean / seq_mean) is done by
// hpc_rlhf/ops/_loss_common.py on the [B, K] sums.
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

struct PpoParams {
  float lo, hi, dual;  // dual <= 0: no dual clip
};

// One row of T tokens -> out[7] = loss sum, count, clipped, sum(old - logp), ratio sum,
// ratio max, dual-clipped; dc[t] = d loss_t / d logp_t (kGrad only).
template <bool kGrad>
void ppo_row(const float* __restrict lp, const float* __restrict old, const float* __restrict a,
             const uint8_t* __restrict m, int64_t steps, PpoParams p, float* __restrict dc,
             float* out) {
  float loss_sum = 0, count = 0, clipped_n = 0, kl = 0, ratio_sum = 0, ratio_max = 0, dual_n = 0;
  const bool use_dual = p.dual > 0.0f;
#pragma omp simd reduction(+ : loss_sum, count, clipped_n, kl, ratio_sum, dual_n) \
    reduction(max : ratio_max)
  for (int64_t t = 0; t < steps; ++t) {
    const bool valid = m[t] != 0;
    const float diff = lp[t] - old[t], ratio = fast_exp(diff), at = a[t];
    const float unclipped = ratio * at;
    const float clipped_term = std::min(std::max(ratio, p.lo), p.hi) * at;
    const bool clipped = clipped_term < unclipped;
    float l = -std::min(unclipped, clipped_term);
    float d = clipped ? 0.0f : -ratio * at;
    const bool dual_on = use_dual && at < 0.0f && l > -p.dual * at;
    l = dual_on ? -p.dual * at : l;
    d = dual_on ? 0.0f : d;
    loss_sum += valid ? l : 0.0f;
    count += valid ? 1.0f : 0.0f;
    clipped_n += (valid && clipped) ? 1.0f : 0.0f;
    kl += valid ? -diff : 0.0f;
    ratio_sum += valid ? ratio : 0.0f;
    ratio_max = std::max(ratio_max, valid ? ratio : 0.0f);
    dual_n += (valid && dual_on) ? 1.0f : 0.0f;
    if constexpr (kGrad) dc[t] = valid ? d : 0.0f;
  }
  out[0] = loss_sum, out[1] = count, out[2] = clipped_n, out[3] = kl, out[4] = ratio_sum;
  out[5] = ratio_max, out[6] = dual_n;
}

// One row -> out[5] = loss sum, count, clipped, value sum, squared-error sum; dc = d loss / dv.
template <bool kGrad>
void value_row(const float* __restrict v, const float* __restrict old,
               const float* __restrict ret, const uint8_t* __restrict m, int64_t steps,
               float clip, float* __restrict dc, float* out) {
  float loss_sum = 0, count = 0, clipped_n = 0, v_sum = 0, sq_sum = 0;
  const bool use_clip = clip >= 0.0f;
#pragma omp simd reduction(+ : loss_sum, count, clipped_n, v_sum, sq_sum)
  for (int64_t t = 0; t < steps; ++t) {
    const bool valid = m[t] != 0;
    const float err = v[t] - ret[t], sq = err * err;
    const float vc = std::min(std::max(v[t], old[t] - clip), old[t] + clip);
    const float sq_clip = use_clip ? (vc - ret[t]) * (vc - ret[t]) : sq;
    const bool clipped = sq_clip > sq;
    loss_sum += valid ? 0.5f * std::max(sq, sq_clip) : 0.0f;
    count += valid ? 1.0f : 0.0f;
    clipped_n += (valid && clipped) ? 1.0f : 0.0f;
    v_sum += valid ? v[t] : 0.0f;
    sq_sum += valid ? sq : 0.0f;
    if constexpr (kGrad) dc[t] = (valid && !clipped) ? err : 0.0f;
  }
  out[0] = loss_sum, out[1] = count, out[2] = clipped_n, out[3] = v_sum, out[4] = sq_sum;
}

}  // namespace

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
  const PpoParams p{1.0f - static_cast<float>(clip_low), 1.0f + static_cast<float>(clip_high),
                    static_cast<float>(dual_clip)};
#pragma omp parallel for schedule(dynamic, 4) num_threads(at::get_num_threads()) \
    if (batch * steps >= kParallelMinWork)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t o = b * steps;
    if (dc) {
      ppo_row<true>(lp + o, old + o, a + o, m + o, steps, p, dc + o, out + b * 7);
    } else {
      ppo_row<false>(lp + o, old + o, a + o, m + o, steps, p, nullptr, out + b * 7);
    }
  }
  return {rows, dcoef};
}

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
#pragma omp parallel for schedule(dynamic, 4) num_threads(at::get_num_threads()) \
    if (batch * steps >= kParallelMinWork)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t o = b * steps;
    if (dc) {
      value_row<true>(v + o, old + o, ret + o, m + o, steps, c, dc + o, out + b * 5);
    } else {
      value_row<false>(v + o, old + o, ret + o, m + o, steps, c, nullptr, out + b * 5);
    }
  }
  return {rows, dcoef};
}

}  // namespace hpc_rlhf
