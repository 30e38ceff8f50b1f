//! CPU kernels shared by the dinov2 crates, with no candle dependency (so `dinov2-curate` can use them too).
//!
//! * [`sgemm`]: an f32 matrix product whose right-hand side is packed once into the micro-kernel's panel
//!   layout ([`PackedB`]) and reused for every call: a model's weights at load time, the centroids of a k-means
//!   iteration. AVX2+FMA micro-kernels are chosen at run time, with a portable fallback. The output can start
//!   from zero or from its current values (a residual stream), take a bias, and pass each finished tile through
//!   a function while it is still in cache (GELU).
//!
//! ```
//! use dinov2_kernels::sgemm::{gemm_packed, Output, PackedB, Parallelism};
//! // y[m, n] = x[m, k] · wᵀ + b for a linear layer's weight w of shape [n, k].
//! let (m, k, n) = (3, 4, 2);
//! let x: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
//! let w = vec![1., 0., 0., 0., /* row 2 */ 0., 1., 1., 0.];
//! let packed = PackedB::from_weight(&w, n, k).unwrap();
//! let mut y = vec![0f32; m * n];
//! let out = Output { data: &mut y, ld: n, accumulate: false, bias: Some(&[10., 20.]) };
//! gemm_packed(&x, m, k, &packed, out, None, Parallelism::Rayon).unwrap();
//! assert_eq!(y, [10., 23., 14., 31., 18., 39.]);
//! ```
#![warn(missing_docs)]

pub mod sgemm;

pub use sgemm::{
    gemm_packed, gemm_packed_new, gemm_packed_raw, Output, PackedB, Parallelism, RawOutput,
    ShapeError, TileMap,
};
