//! The varlen attention op: a `CustomOp3` whose forward runs the flash forward and keeps its log-sum-exp, and whose
//! backward runs the flash backward through a second op.

use std::ffi::CStr;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::ffi;

/// The only head dimension the compiled kernels handle.
const HEAD_DIM: usize = 64;

/// Extra rows per segment in the backward's f32 scratch buffers (`dq_accum`, `softmax_d`): flash-attn's largest
/// block size along the query axis, so that the kernels can skip bounds checks (see upstream `mha_varlen_bwd`).
const SCRATCH_ROWS_PER_SEGMENT: usize = 128;

/// Variable-length (packed) multi-head attention, `softmax(q kᵀ · softmax_scale) v` within each segment, on
/// flash-attn 2's kernels; differentiable (the backward runs flash-attn's backward for dq, dk and dv).
///
/// * `q`, `k`, `v`: `(total_tokens, heads, 64)`, bf16 or f16 (all three the same), on one CUDA device. The last
///   dimension must be contiguous; the token and head strides are free, so `q`, `k` and `v` can be strided views
///   of a fused `(total, 3, heads, 64)` qkv tensor without a copy. (Views whose offset or strides are not multiples
///   of 8 elements, the kernels' 16-byte alignment, are copied first.)
/// * `cu_seqlens`: u32 tensor of `b + 1` cumulative offsets on the same device: `0, len_0, len_0 + len_1, …,
///   total`. Queries and keys share these segments. Its values are checked (which synchronises the device) only in
///   builds with debug assertions.
/// * `max_seqlen`: the longest segment (an upper bound is fine; it sets the kernels' grid).
/// * `softmax_scale`: usually `1 / sqrt(64) = 0.125`.
///
/// Returns `(total_tokens, heads, 64)`, contiguous, of the input dtype. Errors (never panics) on shapes, dtypes or
/// devices it does not handle; on a CPU device it returns "flash-attn needs a CUDA device".
///
/// ```no_run
/// use candle_core::{DType, Device, IndexOp, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::new_cuda(0)?;
/// // Packed batch: one global crop of 261 tokens and two local crops of 54, 6 heads.
/// let (total, heads) = (261 + 2 * 54, 6);
/// let qkv = Var::from_tensor(
///     &Tensor::randn(0f32, 1., (total, 3, heads, 64), &dev)?.to_dtype(DType::BF16)?,
/// )?;
/// let (q, k, v) = (qkv.i((.., 0))?, qkv.i((.., 1))?, qkv.i((.., 2))?); // strided views, no copy
/// let cu_seqlens = Tensor::new(&[0u32, 261, 315, 369], &dev)?;
/// let out = dinov2_flash_attn::flash_attn_varlen(&q, &k, &v, &cu_seqlens, 261, 0.125)?;
/// let grads = out.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
/// let dqkv = grads.get(qkv.as_tensor()).expect("gradient of qkv"); // (total, 3, heads, 64)
/// # let _ = dqkv;
/// # Ok(())
/// # }
/// ```
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_seqlen: usize,
    softmax_scale: f32,
) -> Result<Tensor> {
    let total = validate(q, k, v, cu_seqlens, max_seqlen)?;
    if !q.device().is_cuda() {
        bail!(
            "flash-attn needs a CUDA device (the inputs are on {:?})",
            q.device().location()
        )
    }
    if !softmax_scale.is_finite() {
        bail!("flash-attn: softmax_scale must be finite, got {softmax_scale}")
    }
    if cfg!(debug_assertions) {
        check_cu_seqlens_values(cu_seqlens, total, max_seqlen)?;
    }
    let (q, k, v) = (kernel_layout(q)?, kernel_layout(k)?, kernel_layout(v)?);
    let cu_seqlens = cu_seqlens.contiguous()?;
    q.apply_op3(
        &k,
        &v,
        FlashAttnVarlen {
            cu_seqlens,
            max_seqlen,
            softmax_scale,
            lse: Mutex::new(None),
        },
    )
}

/// Shape, dtype and device checks of the public function; returns the number of tokens.
fn validate(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_seqlen: usize,
) -> Result<usize> {
    let (total, heads, head_dim) = match q.dims() {
        &[t, h, d] => (t, h, d),
        dims => {
            bail!("flash-attn: q must be (total_tokens, heads, {HEAD_DIM}), got shape {dims:?}")
        }
    };
    if head_dim != HEAD_DIM {
        bail!(
            "flash-attn: head dim must be {HEAD_DIM} (the only one compiled), got q of shape {:?}",
            q.dims()
        )
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.dims() != q.dims() {
            bail!(
                "flash-attn: {name} must have q's shape {:?} (same tokens, heads and head dim), got {:?}",
                q.dims(),
                t.dims()
            )
        }
    }
    let dtype = q.dtype();
    if !matches!(dtype, DType::BF16 | DType::F16) {
        bail!("flash-attn: q, k and v must be bf16 or f16, got {dtype:?}")
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.dtype() != dtype {
            bail!("flash-attn: {name} is {:?} but q is {dtype:?}", t.dtype())
        }
    }
    if cu_seqlens.dtype() != DType::U32 {
        bail!(
            "flash-attn: cu_seqlens must be u32, got {:?}",
            cu_seqlens.dtype()
        )
    }
    let n = match cu_seqlens.dims() {
        &[n] => n,
        dims => bail!("flash-attn: cu_seqlens must be 1-d (b + 1 offsets), got shape {dims:?}"),
    };
    if n < 2 {
        bail!("flash-attn: cu_seqlens needs b + 1 >= 2 offsets, got {n}")
    }
    for (name, t) in [("k", k), ("v", v), ("cu_seqlens", cu_seqlens)] {
        if !t.device().same_device(q.device()) {
            bail!(
                "flash-attn: {name} is on {:?} but q is on {:?}",
                t.device().location(),
                q.device().location()
            )
        }
    }
    if total == 0 || heads == 0 {
        bail!("flash-attn: empty input of shape {:?}", q.dims())
    }
    if max_seqlen == 0 || max_seqlen > total {
        bail!("flash-attn: max_seqlen must be in 1..={total} (total tokens), got {max_seqlen}")
    }
    let fits_i32 = |x: usize| i32::try_from(x).is_ok();
    if !fits_i32(total * heads * HEAD_DIM) || !fits_i32(n - 1 + total * SCRATCH_ROWS_PER_SEGMENT) {
        bail!("flash-attn: {total} tokens x {heads} heads is too large for the kernels' 32-bit indexing")
    }
    Ok(total)
}

/// Reads `cu_seqlens` back (a device synchronisation) and checks 0 = c_0 <= c_1 <= … <= c_b = total with every
/// segment at most `max_seqlen` long.
fn check_cu_seqlens_values(cu_seqlens: &Tensor, total: usize, max_seqlen: usize) -> Result<()> {
    let c = cu_seqlens.to_vec1::<u32>()?;
    if c.first() != Some(&0) || c.last().map(|&x| x as usize) != Some(total) {
        bail!("flash-attn: cu_seqlens must run from 0 to the {total} tokens, got {c:?}")
    }
    for w in c.windows(2) {
        if w[1] < w[0] {
            bail!("flash-attn: cu_seqlens must not decrease, got {c:?}")
        }
        if (w[1] - w[0]) as usize > max_seqlen {
            bail!(
                "flash-attn: a segment of {} tokens is longer than max_seqlen = {max_seqlen}",
                w[1] - w[0]
            )
        }
    }
    Ok(())
}

/// Whether the kernels can read `t` (rank 3) in place: last dim contiguous and 16-byte aligned rows (the start
/// offset and the token and head strides multiples of 8 elements).
fn kernel_readable(l: &Layout) -> bool {
    let s = l.stride();
    s.len() == 3 && s[2] == 1 && l.start_offset() % 8 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0
}

fn kernel_layout(t: &Tensor) -> Result<Tensor> {
    if kernel_readable(t.layout()) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

fn cuda_error(what: &str, code: i32) -> candle_core::Error {
    // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any value.
    let msg = unsafe { CStr::from_ptr(ffi::dinov2_flash_attn_error_string(code)) };
    candle_core::Error::Cuda(
        format!(
            "flash-attn {what}: CUDA error {code} ({})",
            msg.to_string_lossy()
        )
        .into(),
    )
}

fn driver_error(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Cuda(format!("flash-attn: {e}").into())
}

/// `cu_seqlens` as a device slice (u32, read by the kernels as i32) with `b`.
fn cu_seqlens_slice(storage: &Storage, layout: &Layout) -> Result<(usize, usize, usize)> {
    let Storage::Cuda(_) = storage else {
        bail!("flash-attn: cu_seqlens must be on the CUDA device")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("flash-attn: cu_seqlens must be contiguous")
    };
    Ok((start, end, end - start - 1))
}

/// Row (token) and head strides of a rank-3 layout, as the kernels take them.
fn strides(l: &Layout) -> (i64, i64) {
    let s = l.stride();
    (s[0] as i64, s[1] as i64)
}

/// The kernels of both ops, generic over the storage type (bf16 or f16), which `launch` takes from q's dtype.
trait HalfKernel {
    /// "forward" or "backward", for errors.
    const WHAT: &'static str;

    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
        is_bf16: bool,
    ) -> Result<(CudaStorage, Shape)>;

    fn launch(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::BF16 => self.cuda_fwd_t::<bf16>(q, q_l, k, k_l, v, v_l, true),
            DType::F16 => self.cuda_fwd_t::<f16>(q, q_l, k, k_l, v, v_l, false),
            dt => bail!(
                "flash-attn {}: q, k and v must be bf16 or f16, got {dt:?}",
                Self::WHAT
            ),
        }
    }
}

/// The forward op. Keeps the log-sum-exp of its forward (f32 `(heads, total)`) for its backward: `apply_op3` wraps
/// the op in an `Arc` that the graph node holds, and hands the same instance to `bwd`.
struct FlashAttnVarlen {
    cu_seqlens: Tensor,
    max_seqlen: usize,
    softmax_scale: f32,
    lse: Mutex<Option<CudaSlice<f32>>>,
}

impl HalfKernel for FlashAttnVarlen {
    const WHAT: &'static str = "forward";

    fn cuda_fwd_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
        is_bf16: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let (total, heads, head_dim) = q_l.shape().dims3()?;
        if head_dim != HEAD_DIM || k_l.shape() != q_l.shape() || v_l.shape() != q_l.shape() {
            bail!("flash-attn: q, k, v must all be (total, heads, {HEAD_DIM}), got {q_l:?} {k_l:?} {v_l:?}")
        }
        for (name, l) in [("q", q_l), ("k", k_l), ("v", v_l)] {
            if !kernel_readable(l) {
                bail!("flash-attn: {name} needs a contiguous last dim and 16-byte aligned rows, got {l:?}")
            }
        }
        let dev = q.device().clone();
        let stream = dev.cuda_stream();

        let (cu_storage, cu_layout) = self.cu_seqlens.storage_and_layout();
        let (cu_start, cu_end, b) = cu_seqlens_slice(&cu_storage, cu_layout)?;
        let Storage::Cuda(cu_storage) = &*cu_storage else {
            unreachable!("checked by cu_seqlens_slice")
        };
        let cu = cu_storage.as_cuda_slice::<u32>()?.slice(cu_start..cu_end);

        let q = q.as_cuda_slice::<T>()?.slice(q_l.start_offset()..);
        let k = k.as_cuda_slice::<T>()?.slice(k_l.start_offset()..);
        let v = v.as_cuda_slice::<T>()?.slice(v_l.start_offset()..);
        let out_shape = Shape::from((total, heads, HEAD_DIM));
        let out_l = Layout::contiguous(&out_shape);
        let mut out = dev.alloc_zeros::<T>(out_shape.elem_count())?;
        let mut lse = dev.alloc_zeros::<f32>(heads * total)?;

        stream.context().bind_to_thread().map_err(driver_error)?;
        let (qs, ks, vs, os) = (strides(q_l), strides(k_l), strides(v_l), strides(&out_l));
        let rc = {
            let (q_ptr, _q_guard) = q.device_ptr(&stream);
            let (k_ptr, _k_guard) = k.device_ptr(&stream);
            let (v_ptr, _v_guard) = v.device_ptr(&stream);
            let (cu_ptr, _cu_guard) = cu.device_ptr(&stream);
            let (o_ptr, _o_guard) = out.device_ptr_mut(&stream);
            let (lse_ptr, _lse_guard) = lse.device_ptr_mut(&stream);
            // SAFETY: the pointers are live device allocations of the sizes the kernels read and write (checked
            // shapes and strides above), the guards keep candle's stream-order events until after the launch, and
            // the launch goes on candle's stream of this device.
            unsafe {
                ffi::dinov2_flash_attn_varlen_fwd_hdim64(
                    q_ptr as *const _,
                    k_ptr as *const _,
                    v_ptr as *const _,
                    o_ptr as *mut _,
                    lse_ptr as *mut f32,
                    cu_ptr as *const i32,
                    qs.0,
                    qs.1,
                    ks.0,
                    ks.1,
                    vs.0,
                    vs.1,
                    os.0,
                    os.1,
                    b as i32,
                    heads as i32,
                    self.max_seqlen as i32,
                    total as i32,
                    self.softmax_scale,
                    i32::from(is_bf16),
                    stream.cu_stream() as *mut _,
                )
            }
        };
        if rc != 0 {
            return Err(cuda_error("forward", rc));
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape))
    }
}

impl CustomOp3 for FlashAttnVarlen {
    fn name(&self) -> &'static str {
        "flash-attn-varlen-hdim64"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("flash-attn needs a CUDA device")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.launch(q, q_l, k, k_l, v, v_l)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        let Some(lse) = lse.as_ref() else {
            bail!("flash-attn: backward without a forward log-sum-exp (the forward did not run on CUDA)")
        };
        if grad_out.dims() != out.dims() || grad_out.dtype() != out.dtype() {
            bail!(
                "flash-attn: gradient {:?} {:?} does not match the output {:?} {:?}",
                grad_out.dims(),
                grad_out.dtype(),
                out.dims(),
                out.dtype()
            )
        }
        let dout = kernel_layout(grad_out)?;
        let out = kernel_layout(out)?;
        let (q, k, v) = (kernel_layout(q)?, kernel_layout(k)?, kernel_layout(v)?);
        let op = FlashAttnVarlenBwd {
            out: &out,
            dout: &dout,
            lse,
            cu_seqlens: &self.cu_seqlens,
            max_seqlen: self.max_seqlen,
            softmax_scale: self.softmax_scale,
        };
        // (3, total, heads, 64): dq, dk, dv; `get` narrows without a copy.
        let dqkv = q.apply_op3_no_bwd(&k, &v, &op)?;
        Ok((Some(dqkv.get(0)?), Some(dqkv.get(1)?), Some(dqkv.get(2)?)))
    }
}

/// The backward as an op of its own (no backward of its own): inputs q, k, v; the output, its gradient, the
/// log-sum-exp and the segments in the struct. Output: dq, dk, dv packed as `(3, total, heads, 64)`.
struct FlashAttnVarlenBwd<'a> {
    out: &'a Tensor,
    dout: &'a Tensor,
    lse: &'a CudaSlice<f32>,
    cu_seqlens: &'a Tensor,
    max_seqlen: usize,
    softmax_scale: f32,
}

impl HalfKernel for FlashAttnVarlenBwd<'_> {
    const WHAT: &'static str = "backward";

    fn cuda_fwd_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
        is_bf16: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let (total, heads, head_dim) = q_l.shape().dims3()?;
        let (o_storage, o_l) = self.out.storage_and_layout();
        let (do_storage, do_l) = self.dout.storage_and_layout();
        for (name, l) in [
            ("q", q_l),
            ("k", k_l),
            ("v", v_l),
            ("out", o_l),
            ("grad", do_l),
        ] {
            if head_dim != HEAD_DIM || l.shape() != q_l.shape() {
                bail!("flash-attn backward: {name} must be (total, heads, {HEAD_DIM}) like q {q_l:?}, got {l:?}")
            }
            if !kernel_readable(l) {
                bail!("flash-attn backward: {name} needs a contiguous last dim and 16-byte aligned rows, got {l:?}")
            }
        }
        if self.lse.len() != heads * total {
            bail!(
                "flash-attn backward: log-sum-exp has {} values, expected {heads} x {total}",
                self.lse.len()
            )
        }
        let (Storage::Cuda(o_storage), Storage::Cuda(do_storage)) = (&*o_storage, &*do_storage)
        else {
            bail!("flash-attn backward: the output and its gradient must be on the CUDA device")
        };
        let dev = q.device().clone();
        let stream = dev.cuda_stream();

        let (cu_storage, cu_layout) = self.cu_seqlens.storage_and_layout();
        let (cu_start, cu_end, b) = cu_seqlens_slice(&cu_storage, cu_layout)?;
        let Storage::Cuda(cu_storage) = &*cu_storage else {
            unreachable!("checked by cu_seqlens_slice")
        };
        let cu = cu_storage.as_cuda_slice::<u32>()?.slice(cu_start..cu_end);

        let q = q.as_cuda_slice::<T>()?.slice(q_l.start_offset()..);
        let k = k.as_cuda_slice::<T>()?.slice(k_l.start_offset()..);
        let v = v.as_cuda_slice::<T>()?.slice(v_l.start_offset()..);
        let o = o_storage.as_cuda_slice::<T>()?.slice(o_l.start_offset()..);
        let dout = do_storage
            .as_cuda_slice::<T>()?
            .slice(do_l.start_offset()..);

        let n = total * heads * HEAD_DIM;
        let out_shape = Shape::from((3, total, heads, HEAD_DIM));
        let grad_l = Layout::contiguous((total, heads, HEAD_DIM));
        let gs = strides(&grad_l);
        // Zeros: tokens outside every segment (if cu_seqlens does not cover them) get zero gradients.
        let mut dqkv = dev.alloc_zeros::<T>(3 * n)?;
        let padded_rows = total + SCRATCH_ROWS_PER_SEGMENT * b;
        let mut dq_accum = dev.alloc_zeros::<f32>(padded_rows * heads * HEAD_DIM)?;
        let mut softmax_d = dev.alloc_zeros::<f32>(heads * padded_rows)?;
        let mut rng_state = dev.alloc_zeros::<u64>(2)?;

        stream.context().bind_to_thread().map_err(driver_error)?;
        let (qs, ks, vs, os, dos) = (
            strides(q_l),
            strides(k_l),
            strides(v_l),
            strides(o_l),
            strides(do_l),
        );
        let elem = std::mem::size_of::<T>() as u64;
        let rc = {
            let (q_ptr, _q_guard) = q.device_ptr(&stream);
            let (k_ptr, _k_guard) = k.device_ptr(&stream);
            let (v_ptr, _v_guard) = v.device_ptr(&stream);
            let (o_ptr, _o_guard) = o.device_ptr(&stream);
            let (do_ptr, _do_guard) = dout.device_ptr(&stream);
            let (lse_ptr, _lse_guard) = self.lse.device_ptr(&stream);
            let (cu_ptr, _cu_guard) = cu.device_ptr(&stream);
            let (dqkv_ptr, _dqkv_guard) = dqkv.device_ptr_mut(&stream);
            let (dq_accum_ptr, _dq_accum_guard) = dq_accum.device_ptr_mut(&stream);
            let (softmax_d_ptr, _softmax_d_guard) = softmax_d.device_ptr_mut(&stream);
            let (rng_ptr, _rng_guard) = rng_state.device_ptr_mut(&stream);
            let dq_ptr = dqkv_ptr;
            let dk_ptr = dqkv_ptr + n as u64 * elem;
            let dv_ptr = dqkv_ptr + 2 * n as u64 * elem;
            // SAFETY: as in the forward; dq, dk and dv are the three consecutive thirds of `dqkv`, and the scratch
            // buffers have the sizes upstream's mha_varlen_bwd allocates.
            unsafe {
                ffi::dinov2_flash_attn_varlen_bwd_hdim64(
                    q_ptr as *const _,
                    k_ptr as *const _,
                    v_ptr as *const _,
                    o_ptr as *const _,
                    do_ptr as *const _,
                    dq_ptr as *mut _,
                    dk_ptr as *mut _,
                    dv_ptr as *mut _,
                    lse_ptr as *const f32,
                    dq_accum_ptr as *mut f32,
                    softmax_d_ptr as *mut f32,
                    rng_ptr as *mut u64,
                    cu_ptr as *const i32,
                    qs.0,
                    qs.1,
                    ks.0,
                    ks.1,
                    vs.0,
                    vs.1,
                    os.0,
                    os.1,
                    dos.0,
                    dos.1,
                    gs.0,
                    gs.1,
                    gs.0,
                    gs.1,
                    gs.0,
                    gs.1,
                    b as i32,
                    heads as i32,
                    self.max_seqlen as i32,
                    total as i32,
                    self.softmax_scale,
                    i32::from(is_bf16),
                    stream.cu_stream() as *mut _,
                )
            }
        };
        if rc != 0 {
            return Err(cuda_error("backward", rc));
        }
        Ok((CudaStorage::wrap_cuda_slice(dqkv, dev), out_shape))
    }
}

impl CustomOp3 for FlashAttnVarlenBwd<'_> {
    fn name(&self) -> &'static str {
        "flash-attn-varlen-hdim64-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("flash-attn needs a CUDA device")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.launch(q, q_l, k, k_l, v, v_l)
    }
}
