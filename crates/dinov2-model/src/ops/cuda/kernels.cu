// CUDA kernels of dinov2-model's ops (feature `cuda`), compiled to PTX by build.rs and loaded through candle's
// `CudaDevice::get_or_load_custom_func`. Every reduction runs in f32 whatever the storage type (bf16, f16, f32).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m, 32));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m, 32);
    return v;
}

// y = softmax(x) over each `ncols`-wide row; one warp per row, `blockDim = (32, rows per block)`.
template <typename T>
__device__ void softmax_fwd(const T *__restrict__ x, T *__restrict__ y, int64_t nrows, int ncols) {
    const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= nrows) return;
    const T *xr = x + row * ncols;
    T *yr = y + row * ncols;
    const int lane = threadIdx.x;
    float m = -INFINITY;
    for (int c = lane; c < ncols; c += 32) m = fmaxf(m, to_f32(xr[c]));
    m = warp_max(m);
    float s = 0.f;
    for (int c = lane; c < ncols; c += 32) s += __expf(to_f32(xr[c]) - m);
    s = warp_sum(s);
    const float inv = 1.f / s;
    for (int c = lane; c < ncols; c += 32) yr[c] = from_f32<T>(__expf(to_f32(xr[c]) - m) * inv);
}

// dx = y * (g - sum(g * y)) over each row (the softmax backward from its output y and the upstream gradient g).
template <typename T>
__device__ void softmax_bwd(const T *__restrict__ y, const T *__restrict__ g, T *__restrict__ dx, int64_t nrows,
                            int ncols) {
    const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= nrows) return;
    const T *yr = y + row * ncols;
    const T *gr = g + row * ncols;
    T *dr = dx + row * ncols;
    const int lane = threadIdx.x;
    float dot = 0.f;
    for (int c = lane; c < ncols; c += 32) dot += to_f32(yr[c]) * to_f32(gr[c]);
    dot = warp_sum(dot);
    for (int c = lane; c < ncols; c += 32) {
        const float yv = to_f32(yr[c]);
        dr[c] = from_f32<T>(yv * (to_f32(gr[c]) - dot));
    }
}

#define SOFTMAX_KERNELS(T, SUFFIX)                                                                          \
    extern "C" __global__ void dinov2_softmax_fwd_##SUFFIX(const T *x, T *y, int64_t nrows, int ncols) {     \
        softmax_fwd<T>(x, y, nrows, ncols);                                                                 \
    }                                                                                                       \
    extern "C" __global__ void dinov2_softmax_bwd_##SUFFIX(const T *y, const T *g, T *dx, int64_t nrows,     \
                                                           int ncols) {                                     \
        softmax_bwd<T>(y, g, dx, nrows, ncols);                                                             \
    }

SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(__nv_bfloat16, bf16)
SOFTMAX_KERNELS(__half, f16)
