//! Fused CPU kernels agree with the generic candle compositions, forward and backward.

use candle_core::{DType, Device, Tensor, Var};
use dinov2_model::ops::{self, AttentionBackend, CpuFusedAttention, GenericAttention, SeqLayout};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6)
}

/// Compares forward values and input gradients of a fused op against its generic version.
fn compare(
    name: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    generic: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let w = rand(out.dims(), 99);
        let grads = (&out * w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Tensor> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).unwrap().clone())
            .collect();
        (out, gs)
    };
    let (a, ga) = run(&fused);
    let (b, gb) = run(&generic);
    let e = max_rel(&a, &b);
    assert!(e < tol, "{name}: forward relative error {e:e}");
    for (i, (x, y)) in ga.iter().zip(&gb).enumerate() {
        let e = max_rel(x, y);
        assert!(
            e < tol,
            "{name}: gradient of input {i} relative error {e:e}"
        );
    }
}

#[test]
fn layer_norm_fused_equals_generic() {
    compare(
        "layer_norm",
        &[rand(&[3, 5, 24], 1), rand(&[24], 2), rand(&[24], 3)],
        |t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap(),
        |t| ops::layer_norm_generic(&t[0], &t[1], &t[2], 1e-6).unwrap(),
        1e-5,
    );
}

#[test]
fn softmax_fused_equals_generic() {
    compare(
        "softmax",
        &[rand(&[4, 7, 33], 4)],
        |t| ops::softmax_last_dim(&t[0]).unwrap(),
        |t| ops::softmax_last_dim_generic(&t[0]).unwrap(),
        1e-5,
    );
}

#[test]
fn gelu_fused_equals_candle_erf_gelu() {
    compare(
        "gelu",
        &[rand(&[10, 301], 5)],
        |t| ops::gelu_erf(&t[0]).unwrap(),
        |t| ops::gelu_erf_generic(&t[0]).unwrap(),
        1e-5,
    );
}

#[test]
fn linear_fused_equals_generic() {
    compare(
        "linear",
        &[rand(&[2, 9, 16], 6), rand(&[12, 16], 7), rand(&[12], 8)],
        |t| ops::linear(&t[0], &t[1], Some(&t[2])).unwrap(),
        |t| ops::linear_generic(&t[0], &t[1], Some(&t[2])).unwrap(),
        1e-5,
    );
}

#[test]
fn packed_attention_fused_equals_generic_for_ragged_layouts() {
    // Sequences of 5, 5, 3, 7 tokens, 2 heads of width 4: D = 8, qkv = 24 wide.
    let layout = SeqLayout::from_lengths(&[5, 5, 3, 7]);
    assert_eq!(layout.cu_seqlens(), vec![0, 5, 10, 13, 20]);
    let scale = 0.5;
    compare(
        "attention",
        &[rand(&[20, 24], 9)],
        |t| {
            CpuFusedAttention
                .attention(&t[0], &layout, 2, scale)
                .unwrap()
        },
        |t| {
            GenericAttention
                .attention(&t[0], &layout, 2, scale)
                .unwrap()
        },
        1e-5,
    );
    // Each sequence attends only to itself: changing sequence 3 leaves the others' outputs unchanged.
    let x = rand(&[20, 24], 9);
    let y = Tensor::cat(
        &[
            x.narrow(0, 0, 13).unwrap(),
            (x.narrow(0, 13, 7).unwrap() * 3.0).unwrap(),
        ],
        0,
    )
    .unwrap();
    let a = ops::attention(&x, &layout, 2, scale)
        .unwrap()
        .narrow(0, 0, 13)
        .unwrap();
    let b = ops::attention(&y, &layout, 2, scale)
        .unwrap()
        .narrow(0, 0, 13)
        .unwrap();
    assert_eq!(max_rel(&a, &b), 0.0);
}

#[test]
fn long_sequences_take_the_blocked_online_softmax_and_match_the_exact_one() {
    // Sequences past 384 tokens are attended in key blocks of about 256 with a running maximum and sum
    // (1000 → 4 blocks, 390 → 2): the result must be the exact softmax's. Scores of size ~±40 make the
    // running maximum change from block to block; 2 heads of width 8 (D = 16, qkv 48 wide).
    let layout = SeqLayout::from_lengths(&[1000, 40, 390, 257]);
    let rows = layout.total_rows();
    let qkv = rand(&[rows, 48], 21);
    for scale in [0.35, 2.5] {
        let fused = CpuFusedAttention
            .attention(&qkv, &layout, 2, scale)
            .unwrap();
        let generic = GenericAttention.attention(&qkv, &layout, 2, scale).unwrap();
        let err = max_rel(&fused, &generic);
        assert!(err < 2e-5, "scale {scale}: max relative error {err:e}");
    }
}

#[test]
fn attention_probabilities_are_rows_of_a_softmax() {
    let qkv = rand(&[2 * 6, 3 * 8], 10);
    let p = ops::attention_probs(&qkv, 2, 2, 0.5).unwrap();
    assert_eq!(p.dims(), &[2, 2, 6, 6]);
    let sums = p
        .sum(3)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    assert_eq!(p.dtype(), DType::F32);
}

#[test]
fn long_sequences_split_into_query_blocks_equal_the_generic_path() {
    // 600 tokens is past the single-block size (about 218 query rows per block at this length), so the fused kernel splits each head's
    // queries into blocks; a short segment rides along.
    let layout = SeqLayout::from_lengths(&[600, 7]);
    compare(
        "attention (query blocks)",
        &[rand(&[607, 24], 11)],
        |t| CpuFusedAttention.attention(&t[0], &layout, 2, 0.3).unwrap(),
        |t| GenericAttention.attention(&t[0], &layout, 2, 0.3).unwrap(),
        1e-5,
    );
}
