/******************************************************************************
 * dinov2-flash-attn host entry points: flash-attn 2 varlen forward and backward, head dim 64, non-causal.
 *
 * The forward is candle-flash-attn 0.11.1's `run_mha` (kernels/flash_api.cu, MIT OR Apache-2.0) cut down to a fixed
 * head dim of 64 with no paged/split-kv branch, writing the softmax log-sum-exp to a buffer of the caller.
 * The backward is a torch-free port of the varlen part of `mha_varlen_bwd` and of `set_params_fprop` /
 * `set_params_dgrad` in flash-attention's csrc/flash_attn/flash_api.cpp (commit 0251105a, FA2 2.8.4,
 * BSD-3-Clause, Copyright (c) 2023, Tri Dao), with dropout off (keep probability 1), deterministic = false,
 * window -1/-1, softcap 0, ALiBi off and cumulative seqlens_k. See NOTICE.md and LICENSE-flash-attention.
 *
 * Both return a cudaError_t (0 = cudaSuccess): the first runtime error raised while setting up and launching the
 * kernels (launches are asynchronous; errors inside a kernel surface on the next synchronising call).
 ******************************************************************************/

#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include "namespace_config.h"
#include "flash.h"

namespace {

constexpr int kHeadDim = 64;

inline int round_multiple(int x, int m) { return (x + m - 1) / m * m; }

// set_params_fprop for the varlen, non-causal, no-dropout, no-softcap, no-window case. Strides are in elements.
void set_params_fprop_varlen(Flash_fwd_params &params,
                             const void *q, const void *k, const void *v, void *o,
                             int64_t q_row_stride, int64_t q_head_stride,
                             int64_t k_row_stride, int64_t k_head_stride,
                             int64_t v_row_stride, int64_t v_head_stride,
                             int64_t o_row_stride, int64_t o_head_stride,
                             int32_t *cu_seqlens, void *softmax_lse,
                             int b, int h, int max_seqlen, int total, float softmax_scale, bool is_bf16) {
    // The caller has zeroed `params` (a Flash_bwd_params for the backward, which derives from this struct).
    params.is_bf16 = is_bf16;

    params.q_ptr = const_cast<void *>(q);
    params.k_ptr = const_cast<void *>(k);
    params.v_ptr = const_cast<void *>(v);
    params.o_ptr = o;
    params.q_row_stride = q_row_stride;
    params.k_row_stride = k_row_stride;
    params.v_row_stride = v_row_stride;
    params.q_head_stride = q_head_stride;
    params.k_head_stride = k_head_stride;
    params.v_head_stride = v_head_stride;
    params.o_row_stride = o_row_stride;
    params.o_head_stride = o_head_stride;
    // Varlen: the batch strides stay 0, the kernels offset rows by cu_seqlens.

    params.cu_seqlens_q = cu_seqlens;
    params.cu_seqlens_k = cu_seqlens;
    params.seqused_k = nullptr;
    params.leftpad_k = nullptr;
    params.p_ptr = nullptr;  // no return_softmax
    params.softmax_lse_ptr = softmax_lse;

    params.b = b;
    params.h = h;
    params.h_k = h;
    params.h_h_k_ratio = 1;
    params.seqlen_q = max_seqlen;
    params.seqlen_k = max_seqlen;
    params.seqlen_q_rounded = round_multiple(max_seqlen, 128);
    params.seqlen_k_rounded = round_multiple(max_seqlen, 128);
    params.d = kHeadDim;
    params.d_rounded = round_multiple(kHeadDim, 32);
    params.total_q = total;

    // No softcap.
    params.softcap = 0.0f;
    params.scale_softmax = softmax_scale;
    params.scale_softmax_log2 = softmax_scale * float(M_LOG2E);

    // p_dropout is the probability of keeping an element: 1 (dropout compiled out).
    params.p_dropout = 1.f;
    params.p_dropout_in_uint8_t = uint8_t(std::floor(params.p_dropout * 255.0));
    params.rp_dropout = 1.f / params.p_dropout;
    params.scale_softmax_rp_dropout = params.rp_dropout * params.scale_softmax;

    // Non-causal, no local window.
    params.is_causal = false;
    params.window_size_left = -1;
    params.window_size_right = -1;

    params.alibi_slopes_ptr = nullptr;
    params.alibi_slopes_batch_stride = 0;
    params.block_table = nullptr;
    params.mm_prefix_ranges = nullptr;
    params.knew_ptr = nullptr;
    params.vnew_ptr = nullptr;

    params.is_seqlens_k_cumulative = true;
    params.num_splits = 1;
    params.unpadded_lse = true;  // LSE as (heads, total) f32
    params.seqlenq_ngroups_swapped = false;
}

}  // namespace

extern "C" int dinov2_flash_attn_varlen_fwd_hdim64(
    const void *q, const void *k, const void *v, void *o, float *softmax_lse, int32_t *cu_seqlens,
    int64_t q_row_stride, int64_t q_head_stride,
    int64_t k_row_stride, int64_t k_head_stride,
    int64_t v_row_stride, int64_t v_head_stride,
    int64_t o_row_stride, int64_t o_head_stride,
    int32_t b, int32_t h, int32_t max_seqlen, int32_t total, float softmax_scale, int32_t is_bf16,
    void *stream_ptr) {
    // Clear a stale error of an earlier runtime call so that what is returned belongs to this call.
    (void)cudaGetLastError();
    if (b <= 0 || h <= 0 || total <= 0 || max_seqlen <= 0) { return int(cudaErrorInvalidValue); }

    Flash_fwd_params params;
    std::memset(&params, 0, sizeof(params));
    set_params_fprop_varlen(params, q, k, v, o,
                            q_row_stride, q_head_stride, k_row_stride, k_head_stride,
                            v_row_stride, v_head_stride, o_row_stride, o_head_stride,
                            cu_seqlens, softmax_lse, b, h, max_seqlen, total, softmax_scale, is_bf16 != 0);

    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
    if (is_bf16 != 0) {
        run_mha_fwd_<cutlass::bfloat16_t, kHeadDim, false>(params, stream);
    } else {
        run_mha_fwd_<cutlass::half_t, kHeadDim, false>(params, stream);
    }
    return int(cudaGetLastError());
}

extern "C" int dinov2_flash_attn_varlen_bwd_hdim64(
    const void *q, const void *k, const void *v, const void *o, const void *dout,
    void *dq, void *dk, void *dv,
    float *softmax_lse,    // (h, total) from the forward
    float *dq_accum,       // (total + 128 * b, h, 64) f32 scratch
    float *softmax_d,      // (h, total + 128 * b) f32 scratch
    uint64_t *rng_state,   // 2 u64 (read by the kernel's dropout set-up even with dropout off)
    int32_t *cu_seqlens,
    int64_t q_row_stride, int64_t q_head_stride,
    int64_t k_row_stride, int64_t k_head_stride,
    int64_t v_row_stride, int64_t v_head_stride,
    int64_t o_row_stride, int64_t o_head_stride,
    int64_t do_row_stride, int64_t do_head_stride,
    int64_t dq_row_stride, int64_t dq_head_stride,
    int64_t dk_row_stride, int64_t dk_head_stride,
    int64_t dv_row_stride, int64_t dv_head_stride,
    int32_t b, int32_t h, int32_t max_seqlen, int32_t total, float softmax_scale, int32_t is_bf16,
    void *stream_ptr) {
    (void)cudaGetLastError();
    if (b <= 0 || h <= 0 || total <= 0 || max_seqlen <= 0) { return int(cudaErrorInvalidValue); }

    Flash_bwd_params params;
    std::memset(&params, 0, sizeof(params));
    set_params_fprop_varlen(params, q, k, v, const_cast<void *>(o),
                            q_row_stride, q_head_stride, k_row_stride, k_head_stride,
                            v_row_stride, v_head_stride, o_row_stride, o_head_stride,
                            cu_seqlens, softmax_lse, b, h, max_seqlen, total, softmax_scale, is_bf16 != 0);

    // set_params_dgrad
    params.do_ptr = const_cast<void *>(dout);
    params.do_row_stride = do_row_stride;
    params.do_head_stride = do_head_stride;
    params.dq_ptr = dq;
    params.dk_ptr = dk;
    params.dv_ptr = dv;
    params.dq_row_stride = dq_row_stride;
    params.dk_row_stride = dk_row_stride;
    params.dv_row_stride = dv_row_stride;
    params.dq_head_stride = dq_head_stride;
    params.dk_head_stride = dk_head_stride;
    params.dv_head_stride = dv_head_stride;
    // Varlen: the batch strides stay 0.
    params.dq_accum_ptr = dq_accum;
    params.dk_accum_ptr = nullptr;
    params.dv_accum_ptr = nullptr;
    params.dsoftmax_sum = softmax_d;
    params.deterministic = false;

    // mha_varlen_bwd
    params.dq_accum_split_stride = 0;
    params.total_q = total;
    params.rng_state = rng_state;

    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
    if (is_bf16 != 0) {
        FLASH_NAMESPACE::run_mha_bwd_<cutlass::bfloat16_t, kHeadDim, false>(params, stream);
    } else {
        FLASH_NAMESPACE::run_mha_bwd_<cutlass::half_t, kHeadDim, false>(params, stream);
    }
    return int(cudaGetLastError());
}

extern "C" const char *dinov2_flash_attn_error_string(int error) {
    return cudaGetErrorString(static_cast<cudaError_t>(error));
}
