//! The C entry points of `kernels/flash_api_varlen_hdim64.cu`. Strides are in elements; every function returns a
//! `cudaError_t` (0 = success).

use core::ffi::{c_char, c_int, c_void};

extern "C" {
    /// Varlen forward, head dim 64, non-causal. `softmax_lse`: f32 `(h, total)`, written.
    pub(crate) fn dinov2_flash_attn_varlen_fwd_hdim64(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *mut c_void,
        softmax_lse: *mut f32,
        cu_seqlens: *const i32,
        q_row_stride: i64,
        q_head_stride: i64,
        k_row_stride: i64,
        k_head_stride: i64,
        v_row_stride: i64,
        v_head_stride: i64,
        o_row_stride: i64,
        o_head_stride: i64,
        b: i32,
        h: i32,
        max_seqlen: i32,
        total: i32,
        softmax_scale: f32,
        is_bf16: i32,
        stream: *mut c_void,
    ) -> c_int;

    /// Varlen backward, head dim 64, non-causal. `dq_accum`: f32 `(total + 128 b, h, 64)` scratch; `softmax_d`: f32
    /// `(h, total + 128 b)` scratch; `rng_state`: 2 u64 (zeros; dropout is compiled out).
    pub(crate) fn dinov2_flash_attn_varlen_bwd_hdim64(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *const c_void,
        dout: *const c_void,
        dq: *mut c_void,
        dk: *mut c_void,
        dv: *mut c_void,
        softmax_lse: *const f32,
        dq_accum: *mut f32,
        softmax_d: *mut f32,
        rng_state: *mut u64,
        cu_seqlens: *const i32,
        q_row_stride: i64,
        q_head_stride: i64,
        k_row_stride: i64,
        k_head_stride: i64,
        v_row_stride: i64,
        v_head_stride: i64,
        o_row_stride: i64,
        o_head_stride: i64,
        do_row_stride: i64,
        do_head_stride: i64,
        dq_row_stride: i64,
        dq_head_stride: i64,
        dk_row_stride: i64,
        dk_head_stride: i64,
        dv_row_stride: i64,
        dv_head_stride: i64,
        b: i32,
        h: i32,
        max_seqlen: i32,
        total: i32,
        softmax_scale: f32,
        is_bf16: i32,
        stream: *mut c_void,
    ) -> c_int;

    /// `cudaGetErrorString`.
    pub(crate) fn dinov2_flash_attn_error_string(error: c_int) -> *const c_char;
}
