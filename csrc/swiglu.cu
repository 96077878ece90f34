// SwiGLU on CUDA: out[r, f] = silu(a) * b with a = x[r, f], b = x[r, F + f] (the fused fc1
// output, gate half first). Elementwise, fp32 math for every storage dtype; a 2-D grid of
// (rows, column blocks) so each thread touches one column of one row (coalesced).
#include "cuda_common.cuh"

namespace hpc_rlhf_cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoidf_(float a) { return 1.0f / (1.0f + __expf(-a)); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_fwd_kernel(const T* __restrict__ x, int64_t width, T* __restrict__ out) {
  const int64_t f = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (f >= width) return;
  const int64_t row = blockIdx.x;
  const float a = to_float(x[row * 2 * width + f]);
  const float b = to_float(x[row * 2 * width + width + f]);
  out[row * width + f] = from_float<T>(a * sigmoidf_(a) * b);
}

// d/da = g b s (1 + a (1 - s)), d/db = g a s, s = sigmoid(a)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_bwd_kernel(const T* __restrict__ x, const T* __restrict__ grad_out, int64_t width,
                      T* __restrict__ grad_x) {
  const int64_t f = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (f >= width) return;
  const int64_t row = blockIdx.x;
  const float a = to_float(x[row * 2 * width + f]);
  const float b = to_float(x[row * 2 * width + width + f]);
  const float g = to_float(grad_out[row * width + f]);
  const float s = sigmoidf_(a);
  grad_x[row * 2 * width + f] = from_float<T>(g * b * s * (1.0f + a * (1.0f - s)));
  grad_x[row * 2 * width + width + f] = from_float<T>(g * a * s);
}

template <typename T>
int launch(const void* x, const void* grad_out, int64_t rows, int64_t width, void* out,
           cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows),
                  static_cast<unsigned>((width + kThreads - 1) / kThreads));
  if (grad_out == nullptr) {
    swiglu_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), width,
                                                         static_cast<T*>(out));
  } else {
    swiglu_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(grad_out), width, static_cast<T*>(out));
  }
  return launch_status();
}

}  // namespace
}  // namespace hpc_rlhf_cuda

extern "C" int hpc_swiglu_cuda(const void* x, const void* grad_out, int dtype, int64_t rows,
                               int64_t width, void* out, void* stream) {
  using namespace hpc_rlhf_cuda;
  if (rows == 0 || width == 0) return 0;
  if (rows > 0x7fffffff || (width + kThreads - 1) / kThreads > 65535)  // grid x / y limits
    return static_cast<int>(cudaErrorInvalidConfiguration);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case HPC_F32: return launch<float>(x, grad_out, rows, width, out, s);
    case HPC_BF16: return launch<__nv_bfloat16>(x, grad_out, rows, width, out, s);
    case HPC_F16: return launch<__half>(x, grad_out, rows, width, out, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
