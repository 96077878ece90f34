// Token log-probs / entropy on CUDA: one block per row. Each thread keeps an online
// (max, sum exp, sum exp * (x - max)) over its strided elements (one exp per element: the
// running sums are rescaled only when the max grows), then the block merges the triples with
// warp shuffles. Backward: one block per row recomputes log p = (x - m) - log s.
#include "cuda_common.cuh"

namespace hpc_rlhf_cuda {
namespace {

constexpr int kThreads = 256;

struct Stats {
  float m, s, t;
};

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;
  const float ea = __expf(a.m - m), eb = __expf(b.m - m);
  const float ta = a.s > 0.0f ? ea * (a.t + (a.m - m) * a.s) : 0.0f;
  const float tb = b.s > 0.0f ? eb * (b.t + (b.m - m) * b.s) : 0.0f;
  return {m, a.s * ea + b.s * eb, ta + tb};
}

__device__ __forceinline__ Stats shfl_xor(Stats v, int o) {
  return {__shfl_xor_sync(kFullMask, v.m, o), __shfl_xor_sync(kFullMask, v.s, o),
          __shfl_xor_sync(kFullMask, v.t, o)};
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads) logprobs_fwd_kernel(
    const T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t vocab,
    int64_t vocab_start, float* __restrict__ m_out, float* __restrict__ s_out,
    float* __restrict__ t_out, float* __restrict__ xl_out) {
  __shared__ Stats warp_stats[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  Stats st{-INFINITY, 0.0f, 0.0f};
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = to_float(x[i]);
    if (v > st.m) {  // new max: rescale (the new element contributes exp(0) = 1, d = 0)
      const float a = __expf(st.m - v);
      if (kEntropy) st.t = st.s > 0.0f ? a * (st.t + (st.m - v) * st.s) : 0.0f;
      st.s = st.s * a + 1.0f;
      st.m = v;
    } else if (v != -INFINITY) {
      const float d = v - st.m, e = __expf(d);
      st.s += e;
      if (kEntropy) st.t += e * d;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge(st, shfl_xor(st, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? warp_stats[lane] : Stats{-INFINITY, 0.0f, 0.0f};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) st = merge(st, shfl_xor(st, o));
    if (lane == 0) {
      const int64_t local = labels[row] - vocab_start;
      m_out[row] = st.m;
      s_out[row] = st.s;
      if (kEntropy) t_out[row] = st.t;
      xl_out[row] = (local >= 0 && local < vocab) ? to_float(x[local]) : 0.0f;
    }
  }
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads) logprobs_bwd_kernel(
    const T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t vocab,
    int64_t vocab_start, const float* __restrict__ m, const float* __restrict__ log_s,
    const float* __restrict__ ent,
    const float* __restrict__ g_lp, const float* __restrict__ g_ent, T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  T* gx = grad + row * vocab;
  const float mr = m[row], ls = log_s[row], g = g_lp[row];
  const float h = kEntropy ? ent[row] : 0.0f, ge = kEntropy ? g_ent[row] : 0.0f;
  const int64_t local = labels[row] - vocab_start;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float logp = (to_float(x[i]) - mr) - ls;
    const float coef = kEntropy ? g + ge * (logp + h) : g;
    const float out = -__expf(logp) * coef + (i == local ? g : 0.0f);
    gx[i] = from_float<T>(out);
  }
}

template <typename T>
int fwd(const void* logits, const int64_t* labels, int64_t rows, int64_t vocab, int64_t start,
        int entropy, float* m, float* s, float* t, float* xl, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  if (entropy) {
    logprobs_fwd_kernel<T, true><<<rows, kThreads, 0, stream>>>(x, labels, vocab, start, m, s, t, xl);
  } else {
    logprobs_fwd_kernel<T, false><<<rows, kThreads, 0, stream>>>(x, labels, vocab, start, m, s, t, xl);
  }
  return launch_status();
}

template <typename T>
int bwd(const void* logits, const int64_t* labels, int64_t rows, int64_t vocab, int64_t start,
        const float* m, const float* log_s, const float* ent, const float* g_lp,
        const float* g_ent, void* grad, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  T* gx = static_cast<T*>(grad);
  if (g_ent != nullptr) {
    logprobs_bwd_kernel<T, true><<<rows, kThreads, 0, stream>>>(x, labels, vocab, start, m, log_s,
                                                                ent, g_lp, g_ent, gx);
  } else {
    logprobs_bwd_kernel<T, false><<<rows, kThreads, 0, stream>>>(x, labels, vocab, start, m,
                                                                 log_s, ent, g_lp, g_ent, gx);
  }
  return launch_status();
}

}  // namespace
}  // namespace hpc_rlhf_cuda

extern "C" int hpc_logprobs_fwd_cuda(const void* logits, int dtype, const int64_t* labels,
                                     int64_t rows, int64_t vocab, int64_t vocab_start,
                                     int entropy, float* m, float* s, float* t, float* xl,
                                     void* stream) {
  using namespace hpc_rlhf_cuda;
  if (rows == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case HPC_F32: return fwd<float>(logits, labels, rows, vocab, vocab_start, entropy, m, s, t, xl, st);
    case HPC_BF16:
      return fwd<__nv_bfloat16>(logits, labels, rows, vocab, vocab_start, entropy, m, s, t, xl, st);
    case HPC_F16: return fwd<__half>(logits, labels, rows, vocab, vocab_start, entropy, m, s, t, xl, st);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int hpc_logprobs_bwd_cuda(const void* logits, int dtype, const int64_t* labels,
                                     int64_t rows, int64_t vocab, int64_t vocab_start,
                                     const float* m, const float* log_s, const float* ent,
                                     const float* g_lp, const float* g_ent, void* grad,
                                     void* stream) {
  using namespace hpc_rlhf_cuda;
  if (rows == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case HPC_F32:
      return bwd<float>(logits, labels, rows, vocab, vocab_start, m, log_s, ent, g_lp, g_ent, grad, st);
    case HPC_BF16:
      return bwd<__nv_bfloat16>(logits, labels, rows, vocab, vocab_start, m, log_s, ent, g_lp,
                                g_ent, grad, st);
    case HPC_F16:
      return bwd<__half>(logits, labels, rows, vocab, vocab_start, m, log_s, ent, g_lp, g_ent, grad, st);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
