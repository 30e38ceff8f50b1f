//! Tests of `flash_attn_varlen`. The GPU ones return early (printing why) when `Device::new_cuda(0)` fails; the CPU
//! ones run anywhere the crate builds with its `cuda` feature.

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var, D};

use crate::flash_attn_varlen;

const HEADS: usize = 6;
const HEAD_DIM: usize = 64;
const SCALE: f32 = 0.125; // 1 / sqrt(64)

/// DINOv2's packed batch: 2 global crops of 261 tokens (257 + 4 registers) and 8 local crops of 54 (50 + 4).
fn segment_lengths() -> Vec<usize> {
    let mut lens = vec![261, 261];
    lens.extend([54; 8]);
    lens
}

fn cu_seqlens(lens: &[usize], dev: &Device) -> Result<Tensor> {
    let mut c = vec![0u32];
    for &l in lens {
        c.push(c[c.len() - 1] + l as u32);
    }
    Tensor::new(c.as_slice(), dev)
}

fn cuda_device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            println!("skipping: no CUDA device ({e})");
            None
        }
    }
}

/// Explicit f32 attention per segment: softmax(q kᵀ · scale) v, on (total, heads, 64) tensors. Differentiable
/// through candle's autograd (the row max is detached: it only shifts the logits and cancels in the softmax).
fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    scale: f64,
) -> Result<Tensor> {
    let mut outs = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        // (len, h, d) -> (h, len, d)
        let seg = |t: &Tensor| t.narrow(0, start, len)?.transpose(0, 1)?.contiguous();
        let (qs, ks, vs) = (seg(q)?, seg(k)?, seg(v)?);
        let scores = (qs.matmul(&ks.t()?.contiguous()?)? * scale)?; // (h, len, len)
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        outs.push(p.matmul(&vs)?.transpose(0, 1)?); // (len, h, d)
        start += len;
    }
    Tensor::cat(&outs, 0)
}

/// max |a - b| / max |b|.
fn rel_max_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let err = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(err / scale.max(1e-6))
}

/// Output and dq, dk, dv of `flash_attn_varlen` against the explicit f32 reference on the same (rounded) inputs,
/// with loss = sum(out · g) for a fixed random upstream gradient g.
///
/// Tolerances (max abs error relative to the reference's max magnitude): the kernels accumulate in f32 but round
/// the output, the probabilities P before P·V and dS = P∘(dP − D) before the dQ/dK products to the input dtype,
/// and the upstream gradient reaches them in that dtype too. With unit roundoff u (bf16: 8 significant bits,
/// u = 2^-8 ≈ 3.9e-3; f16: 11 bits, u = 2^-11 ≈ 4.9e-4), the output is off by about u and the gradients by 2u-3u
/// of the largest value (roundings of the operands plus the final one); the bounds leave a margin of about 2-4x:
/// bf16 2e-2 forward and 4e-2 gradients, f16 4e-3 and 8e-3. Real bugs (strides, segments, scale, LSE layout) give
/// errors of order 1. (Estimated, not yet run on a GPU: tighten or loosen with measured numbers.)
fn check_against_reference(dtype: DType, fwd_tol: f32, grad_tol: f32) -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    dev.set_seed(20_240_611)?;
    let lens = segment_lengths();
    let total: usize = lens.iter().sum();
    let max_seqlen = *lens.iter().max().unwrap_or(&1);
    let cu = cu_seqlens(&lens, &dev)?;

    let rand = |shape: (usize, usize, usize)| -> Result<Tensor> {
        Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(dtype)
    };
    let shape = (total, HEADS, HEAD_DIM);
    let (q, k, v) = (
        Var::from_tensor(&rand(shape)?)?,
        Var::from_tensor(&rand(shape)?)?,
        Var::from_tensor(&rand(shape)?)?,
    );
    let g = Tensor::randn(0f32, 1., shape, &dev)?;

    let out = flash_attn_varlen(&q, &k, &v, &cu, max_seqlen, SCALE)?;
    assert_eq!(out.dims(), &[total, HEADS, HEAD_DIM]);
    assert_eq!(out.dtype(), dtype);
    assert!(out.is_contiguous());
    let grads = out.to_dtype(DType::F32)?.mul(&g)?.sum_all()?.backward()?;
    let grad = |x: &Var| grads.get(x.as_tensor()).cloned().expect("flash gradient");
    let (dq, dk, dv) = (grad(&q), grad(&k), grad(&v));

    // The reference on the same values in f32.
    let (qr, kr, vr) = (
        Var::from_tensor(&q.to_dtype(DType::F32)?)?,
        Var::from_tensor(&k.to_dtype(DType::F32)?)?,
        Var::from_tensor(&v.to_dtype(DType::F32)?)?,
    );
    let out_ref = reference_attention(&qr, &kr, &vr, &lens, f64::from(SCALE))?;
    let grads_ref = out_ref.mul(&g)?.sum_all()?.backward()?;
    let grad_ref = |x: &Var| {
        grads_ref
            .get(x.as_tensor())
            .cloned()
            .expect("reference gradient")
    };

    let errs = [
        ("out", rel_max_err(&out, &out_ref)?, fwd_tol),
        ("dq", rel_max_err(&dq, &grad_ref(&qr))?, grad_tol),
        ("dk", rel_max_err(&dk, &grad_ref(&kr))?, grad_tol),
        ("dv", rel_max_err(&dv, &grad_ref(&vr))?, grad_tol),
    ];
    println!("{dtype:?}: relative max errors {errs:?}");
    for (name, err, tol) in errs {
        assert!(
            err <= tol,
            "{dtype:?} {name}: relative max error {err} > {tol}"
        );
    }
    for (name, d) in [("dq", &dq), ("dk", &dk), ("dv", &dv)] {
        assert_eq!(d.dims(), &[total, HEADS, HEAD_DIM], "{name}");
        assert_eq!(d.dtype(), dtype, "{name}");
    }
    Ok(())
}

#[test]
fn varlen_bf16_matches_reference() -> Result<()> {
    check_against_reference(DType::BF16, 2e-2, 4e-2)
}

#[test]
fn varlen_f16_matches_reference() -> Result<()> {
    check_against_reference(DType::F16, 4e-3, 8e-3)
}

/// q, k, v as strided views of one fused (total, 3, heads, 64) tensor give the same output as contiguous copies,
/// and the gradient of the fused tensor is dq, dk, dv interleaved.
#[test]
fn strided_views_of_fused_qkv_match_contiguous() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    dev.set_seed(7)?;
    let lens = segment_lengths();
    let total: usize = lens.iter().sum();
    let cu = cu_seqlens(&lens, &dev)?;
    let qkv = Var::from_tensor(
        &Tensor::randn(0f32, 1., (total, 3, HEADS, HEAD_DIM), &dev)?.to_dtype(DType::BF16)?,
    )?;
    let g = Tensor::randn(0f32, 1., (total, HEADS, HEAD_DIM), &dev)?.to_dtype(DType::BF16)?;

    let (q, k, v) = (qkv.i((.., 0))?, qkv.i((.., 1))?, qkv.i((.., 2))?);
    assert_eq!(
        q.stride(),
        &[3 * HEADS * HEAD_DIM, HEAD_DIM, 1],
        "q should be a strided view"
    );
    assert!(!q.is_contiguous());
    let out = flash_attn_varlen(&q, &k, &v, &cu, 261, SCALE)?;
    let dqkv = out
        .mul(&g)?
        .sum_all()?
        .backward()?
        .get(qkv.as_tensor())
        .cloned()
        .expect("gradient of qkv");

    let copies: Vec<Var> = [&q, &k, &v]
        .iter()
        .map(|t| Var::from_tensor(&t.contiguous()?))
        .collect::<Result<_>>()?;
    let out_c = flash_attn_varlen(&copies[0], &copies[1], &copies[2], &cu, 261, SCALE)?;
    let grads_c = out_c.mul(&g)?.sum_all()?.backward()?;
    let dqkv_c = Tensor::stack(
        &copies
            .iter()
            .map(|c| grads_c.get(c.as_tensor()).cloned().expect("gradient"))
            .collect::<Vec<_>>(),
        1,
    )?;

    // Same values in, same kernel: the forward is bit-identical. dq is accumulated with f32 atomics in an
    // unspecified order, so the gradients may differ in the last bits.
    assert_eq!(
        rel_max_err(&out, &out_c)?,
        0.0,
        "forward differs between strided and contiguous inputs"
    );
    let err = rel_max_err(&dqkv, &dqkv_c)?;
    assert!(
        err <= 1e-2,
        "gradients of strided and contiguous inputs differ: {err}"
    );
    Ok(())
}

/// Validation errors are returned, not panics, for CPU tensors; with valid shapes the CPU gets a clear error.
#[test]
fn cpu_inputs_are_rejected_with_errors() -> Result<()> {
    let dev = Device::Cpu;
    let t = |shape: (usize, usize, usize), dtype: DType| Tensor::zeros(shape, dtype, &dev);
    let cu = Tensor::new(&[0u32, 10, 16], &dev)?;
    let good = t((16, 2, 64), DType::BF16)?;

    let expect_err = |r: Result<Tensor>, needle: &str| {
        let e = r.expect_err(needle).to_string();
        assert!(e.contains(needle), "error {e:?} should mention {needle:?}");
    };
    expect_err(
        flash_attn_varlen(&good, &good, &good, &cu, 10, SCALE),
        "needs a CUDA device",
    );
    let d32 = t((16, 2, 32), DType::BF16)?;
    expect_err(
        flash_attn_varlen(&d32, &d32, &d32, &cu, 10, SCALE),
        "head dim must be 64",
    );
    let f32s = t((16, 2, 64), DType::F32)?;
    expect_err(
        flash_attn_varlen(&f32s, &f32s, &f32s, &cu, 10, SCALE),
        "bf16 or f16",
    );
    let f16s = t((16, 2, 64), DType::F16)?;
    expect_err(
        flash_attn_varlen(&good, &f16s, &good, &cu, 10, SCALE),
        "but q is",
    );
    let other = t((16, 3, 64), DType::BF16)?;
    expect_err(
        flash_attn_varlen(&good, &other, &good, &cu, 10, SCALE),
        "must have q's shape",
    );
    let rank4 = Tensor::zeros((1, 16, 2, 64), DType::BF16, &dev)?;
    expect_err(
        flash_attn_varlen(&rank4, &rank4, &rank4, &cu, 10, SCALE),
        "(total_tokens, heads, 64)",
    );
    let cu_i64 = Tensor::new(&[0i64, 10, 16], &dev)?;
    expect_err(
        flash_attn_varlen(&good, &good, &good, &cu_i64, 10, SCALE),
        "cu_seqlens must be u32",
    );
    let cu_short = Tensor::new(&[0u32], &dev)?;
    expect_err(
        flash_attn_varlen(&good, &good, &good, &cu_short, 10, SCALE),
        "b + 1 >= 2",
    );
    expect_err(
        flash_attn_varlen(&good, &good, &good, &cu, 0, SCALE),
        "max_seqlen",
    );
    expect_err(
        flash_attn_varlen(&good, &good, &good, &cu, 17, SCALE),
        "max_seqlen",
    );
    Ok(())
}
