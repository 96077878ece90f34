// The one Python module of hpc_rlhf: CPU ops always, CUDA ops when built with
// HPC_RLHF_WITH_CUDA (then the .cu launchers of kernels.h are linked in).
#include <torch/extension.h>

#include "cpu_ops.h"

#ifdef HPC_RLHF_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels.h"

namespace hpc_rlhf {
namespace {

void* stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed with cudaError ", err);
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return HPC_F32;
    case at::kBFloat16: return HPC_BF16;
    case at::kHalf: return HPC_F16;
    default: TORCH_CHECK(false, "logits must be fp32, bf16 or fp16");
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, bool entropy) {
  check_cuda(logits, "logits");
  check_cuda(labels, "labels");
  TORCH_CHECK(logits.dim() == 2 && labels.numel() == logits.size(0), "logits [N, V], labels [N]");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor m = at::empty({rows}, opts), s = at::empty({rows}, opts);
  at::Tensor t = at::empty({rows}, opts), xl = at::empty({rows}, opts);
  check_launch(hpc_logprobs_fwd_cuda(logits.data_ptr(), dtype_code(logits),
                                     labels.data_ptr<int64_t>(), rows, logits.size(1), vocab_start,
                                     entropy, m.data_ptr<float>(), s.data_ptr<float>(),
                                     t.data_ptr<float>(), xl.data_ptr<float>(), stream_of(logits)),
               "logprobs_fwd_cuda");
  return {m, s, t, xl};
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                             int64_t vocab_start, const at::Tensor& m,
                             const at::Tensor& log_s,
                             const std::optional<at::Tensor>& ent, const at::Tensor& g_lp,
                             const std::optional<at::Tensor>& g_ent) {
  check_cuda(logits, "logits");
  check_cuda(m, "m");
  check_cuda(log_s, "log_s");
  check_cuda(g_lp, "g_lp");
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  check_launch(hpc_logprobs_bwd_cuda(
                   logits.data_ptr(), dtype_code(logits), labels.data_ptr<int64_t>(),
                   logits.size(0), logits.size(1), vocab_start, m.data_ptr<float>(),
                   log_s.data_ptr<float>(),
                   ent ? ent->data_ptr<float>() : nullptr, g_lp.data_ptr<float>(),
                   g_ent ? g_ent->data_ptr<float>() : nullptr, grad.data_ptr(), stream_of(logits)),
               "logprobs_bwd_cuda");
  return grad;
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  check_cuda(rewards, "rewards");
  check_cuda(values, "values");
  check_cuda(mask, "mask");
  c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  check_launch(hpc_gae_cuda(rewards.data_ptr<float>(), values.data_ptr<float>(),
                            mask.data_ptr<uint8_t>(), rewards.size(0), rewards.size(1),
                            static_cast<float>(gamma), static_cast<float>(lam),
                            adv.data_ptr<float>(), ret.data_ptr<float>(), stream_of(rewards)),
               "gae_cuda");
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> ppo_rows_cuda(const at::Tensor& logp, const at::Tensor& old,
                                                 const at::Tensor& adv, const at::Tensor& mask,
                                                 double clip_low, double clip_high,
                                                 double dual_clip, bool need_grad) {
  check_cuda(logp, "logp");
  check_cuda(old, "old_logp");
  check_cuda(adv, "advantages");
  check_cuda(mask, "mask");
  c10::cuda::CUDAGuard guard(logp.device());
  at::Tensor rows = at::empty({logp.size(0), 7}, logp.options());
  at::Tensor dcoef = need_grad ? at::empty_like(logp) : at::empty({0}, logp.options());
  check_launch(hpc_ppo_rows_cuda(logp.data_ptr<float>(), old.data_ptr<float>(),
                                 adv.data_ptr<float>(), mask.data_ptr<uint8_t>(), logp.size(0),
                                 logp.size(1), static_cast<float>(clip_low),
                                 static_cast<float>(clip_high), static_cast<float>(dual_clip),
                                 rows.data_ptr<float>(),
                                 need_grad ? dcoef.data_ptr<float>() : nullptr, stream_of(logp)),
               "ppo_rows_cuda");
  return {rows, dcoef};
}

std::tuple<at::Tensor, at::Tensor> value_rows_cuda(const at::Tensor& values, const at::Tensor& old,
                                                   const at::Tensor& returns,
                                                   const at::Tensor& mask, double clip,
                                                   bool need_grad) {
  check_cuda(values, "values");
  check_cuda(old, "old_values");
  check_cuda(returns, "returns");
  check_cuda(mask, "mask");
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor rows = at::empty({values.size(0), 5}, values.options());
  at::Tensor dcoef = need_grad ? at::empty_like(values) : at::empty({0}, values.options());
  check_launch(hpc_value_rows_cuda(values.data_ptr<float>(), old.data_ptr<float>(),
                                   returns.data_ptr<float>(), mask.data_ptr<uint8_t>(),
                                   values.size(0), values.size(1), static_cast<float>(clip),
                                   rows.data_ptr<float>(),
                                   need_grad ? dcoef.data_ptr<float>() : nullptr,
                                   stream_of(values)),
               "value_rows_cuda");
  return {rows, dcoef};
}

// SwiGLU forward (grad_out undefined) or backward on rows of x [R, 2F].
at::Tensor swiglu_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& grad_out) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "swiglu_cuda: x must be [rows, 2F]");
  const int64_t rows = x.size(0), width = x.size(1) / 2;
  c10::cuda::CUDAGuard guard(x.device());
  const void* g = nullptr;
  if (grad_out.has_value()) {
    check_cuda(*grad_out, "grad_out");
    TORCH_CHECK(grad_out->sizes() == at::IntArrayRef({rows, width}) &&
                    grad_out->scalar_type() == x.scalar_type(),
                "swiglu_cuda: grad_out must be [rows, F] in x's dtype");
    g = grad_out->data_ptr();
  }
  at::Tensor out = g ? at::empty_like(x) : at::empty({rows, width}, x.options());
  check_launch(hpc_swiglu_cuda(x.data_ptr(), g, dtype_code(x), rows, width, out.data_ptr(),
                               stream_of(x)),
               "swiglu_cuda");
  return out;
}

}  // namespace
}  // namespace hpc_rlhf
#endif  // HPC_RLHF_WITH_CUDA

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hpc_rlhf fused ops: C++ CPU kernels (+ CUDA kernels when built with CUDA)";
  m.def("logprobs_fwd_cpu", &hpc_rlhf::logprobs_fwd_cpu, "row max/sum-exp/entropy sums/label logit");
  m.def("logprobs_bwd_cpu", &hpc_rlhf::logprobs_bwd_cpu, "gradient of log-probs (+entropy)");
  m.def("gae_cpu", &hpc_rlhf::gae_cpu, "masked GAE -> (advantages, returns)");
  m.def("ppo_rows_cpu", &hpc_rlhf::ppo_rows_cpu, "PPO loss row sums and per-token derivative");
  m.def("value_rows_cpu", &hpc_rlhf::value_rows_cpu, "value loss row sums and derivative");
  m.def("swiglu_fwd_cpu", &hpc_rlhf::swiglu_fwd_cpu, "silu(a) * b over rows [a | b]");
  m.def("swiglu_bwd_cpu", &hpc_rlhf::swiglu_bwd_cpu, "gradient of swiglu w.r.t. [a | b]");
  m.def("paged_decode_attention_cpu", &hpc_rlhf::paged_decode_attention_cpu,
        "one query per sequence against its paged K/V ([N, G, S, D] pools)");
  m.def("causal_attention_fwd_cpu", &hpc_rlhf::causal_attention_fwd_cpu,
        "causal attention within segments of [S, B, N, D] -> (out, row log-sum-exp [B, N, S])");
  m.def("causal_attention_bwd_cpu", &hpc_rlhf::causal_attention_bwd_cpu,
        "gradients (dq, dk, dv per query head) of causal_attention_fwd_cpu");
  m.def("rmsnorm_fwd_cpu", &hpc_rlhf::rmsnorm_fwd_cpu,
        "RMSNorm of rows [..., H] -> (y, fp32 rstd [rows])");
  m.def("rmsnorm_bwd_cpu", &hpc_rlhf::rmsnorm_bwd_cpu, "gradients (dx, dweight) of RMSNorm");
  m.def("rope_cpu", &hpc_rlhf::rope_cpu,
        "rotate-half RoPE of [S, B, H, D] at table rows pos (transpose: its gradient)");
#ifdef HPC_RLHF_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  m.def("logprobs_fwd_cuda", &hpc_rlhf::logprobs_fwd_cuda, "CUDA logprobs forward");
  m.def("logprobs_bwd_cuda", &hpc_rlhf::logprobs_bwd_cuda, "CUDA logprobs backward");
  m.def("gae_cuda", &hpc_rlhf::gae_cuda, "CUDA masked GAE");
  m.def("ppo_rows_cuda", &hpc_rlhf::ppo_rows_cuda, "CUDA PPO loss rows");
  m.def("value_rows_cuda", &hpc_rlhf::value_rows_cuda, "CUDA value loss rows");
  m.def("swiglu_cuda", &hpc_rlhf::swiglu_cuda, "CUDA swiglu forward / backward (grad_out)",
        py::arg("x"), py::arg("grad_out") = py::none());
#else
  m.attr("WITH_CUDA") = false;
#endif
}
