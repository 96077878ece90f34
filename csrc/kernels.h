/* Plain C launchers of the CUDA kernels (csrc/*.cu). No torch and no CUDA headers here, so
 * the .cu files compile standalone with nvcc and bindings.cpp can call them with raw
 * pointers. `stream` is a cudaStream_t; each launcher returns a cudaError_t (0 = success).
 * dtype codes: HPC_F32, HPC_BF16, HPC_F16. All tensors are contiguous, rows of length V/T.
 */
#ifndef HPC_RLHF_KERNELS_H_
#define HPC_RLHF_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { HPC_F32 = 0, HPC_BF16 = 1, HPC_F16 = 2 };

/* Per row of logits [rows, vocab]: m = max, s = sum exp(x - m), t = sum exp(x - m)(x - m)
 * (when entropy != 0), xl = logit of labels[r] - vocab_start if on this shard else 0. */
int hpc_logprobs_fwd_cuda(const void* logits, int dtype, const int64_t* labels, int64_t rows,
                          int64_t vocab, int64_t vocab_start, int entropy, float* m, float* s,
                          float* t, float* xl, void* stream);

/* grad [rows, vocab] (logits' dtype) = -p (g_lp + g_ent (log p + ent)) + g_lp onehot,
 * log p = (x - m) - log_s. ent and g_ent may be NULL (no entropy term). */
int hpc_logprobs_bwd_cuda(const void* logits, int dtype, const int64_t* labels, int64_t rows,
                          int64_t vocab, int64_t vocab_start, const float* m, const float* log_s,
                          const float* ent, const float* g_lp, const float* g_ent, void* grad,
                          void* stream);

/* Masked GAE over [batch, steps]; one thread per sequence scans time backwards. */
int hpc_gae_cuda(const float* rewards, const float* values, const uint8_t* mask, int64_t batch,
                 int64_t steps, float gamma, float lam, float* adv, float* ret, void* stream);

/* rows [batch, 7] and dcoef [batch, steps] (may be NULL) of the PPO policy loss. */
int hpc_ppo_rows_cuda(const float* logp, const float* old_logp, const float* adv,
                      const uint8_t* mask, int64_t batch, int64_t steps, float clip_low,
                      float clip_high, float dual_clip, float* rows, float* dcoef, void* stream);

/* rows [batch, 5] and dcoef [batch, steps] (may be NULL) of the value loss; clip < 0: off. */
int hpc_value_rows_cuda(const float* values, const float* old_values, const float* returns,
                        const uint8_t* mask, int64_t batch, int64_t steps, float clip,
                        float* rows, float* dcoef, void* stream);

/* SwiGLU over x [rows, 2 * width] (gate half first), dtype of x/grad_out/out: forward
 * (grad_out == NULL) out [rows, width] = silu(a) * b; backward out [rows, 2 * width] =
 * d(sum grad_out * swiglu)/dx. */
int hpc_swiglu_cuda(const void* x, const void* grad_out, int dtype, int64_t rows, int64_t width,
                    void* out, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* HPC_RLHF_KERNELS_H_ */
