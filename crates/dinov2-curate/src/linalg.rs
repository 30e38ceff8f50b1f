//! Dense kernels: `A * B^T` through the `gemm` crate or, when `B` is reused (centroids), on `B` packed once for
//! `dinov2-kernels`' GEMM; squared norms, and the thread count.

use dinov2_kernels::sgemm::{gemm_packed, Output, PackedB, Parallelism, ShapeError};

use crate::error::{Error, Result};

/// Number of worker threads (rayon's pool, which honours `RAYON_NUM_THREADS`).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// `out[i * n + j] = <a_i, b_j>` for row-major `a` (`m x d`) and `b` (`n x d`).
/// `parallel` lets the GEMM itself use the rayon pool; pass `false` when already inside a parallel loop.
pub fn matmul_abt(
    a: &[f32],
    m: usize,
    b: &[f32],
    n: usize,
    d: usize,
    out: &mut [f32],
    parallel: bool,
) -> Result<()> {
    if a.len() < m * d || b.len() < n * d || out.len() < m * n {
        return Err(Error::Shape {
            op: "gemm",
            reason: format!(
                "{m}x{d} * ({n}x{d})^T with buffers of {}, {} and {} values",
                a.len(),
                b.len(),
                out.len()
            ),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if d == 0 {
        out[..m * n].iter_mut().for_each(|x| *x = 0.0);
        return Ok(());
    }
    let par = if parallel && threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: bounds checked above; dst (m x n, row stride n), lhs (m x d, row stride d) and rhs = b^T (d x n:
    // element (p, j) at b[j * d + p]) lie inside their slices, and `out` does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            d,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            d as isize,
            b.as_ptr(),
            d as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// The rows of `b` (`n x d`) packed once for [`matmul_abt_packed`]: centroids reused over every chunk of an
/// assignment.
pub fn pack_rows(b: &[f32], n: usize, d: usize) -> Result<PackedB> {
    PackedB::from_weight(b, n, d).map_err(shape_error)
}

fn shape_error(e: ShapeError) -> Error {
    Error::Shape {
        op: "gemm",
        reason: e.0,
    }
}

/// [`matmul_abt`] with `b` packed by [`pack_rows`]: `out[i * n + j] = <a_i, b_j>`.
pub fn matmul_abt_packed(
    a: &[f32],
    m: usize,
    b: &PackedB,
    out: &mut [f32],
    parallel: bool,
) -> Result<()> {
    let par = if parallel && threads() > 1 {
        Parallelism::Rayon
    } else {
        Parallelism::None
    };
    let output = Output {
        data: out,
        ld: b.n(),
        accumulate: false,
        bias: None,
    };
    gemm_packed(a, m, b.k(), b, output, None, par).map_err(shape_error)
}

/// Squared L2 norm of every `d`-long row.
pub fn sq_norms(x: &[f32], d: usize) -> Vec<f32> {
    use rayon::prelude::*;
    x.par_chunks(d.max(1)).map(sq_norm).collect()
}

/// Squared L2 norm of one row, accumulated in 8 interleaved lanes (so it vectorises; a single running sum is a
/// chain of dependent additions).
#[inline]
pub fn sq_norm(r: &[f32]) -> f32 {
    const L: usize = 8;
    let mut acc = [0f32; L];
    let mut blocks = r.chunks_exact(L);
    for b in &mut blocks {
        for l in 0..L {
            acc[l] += b[l] * b[l];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in blocks.remainder() {
        s += v * v;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sq_norm_matches_f64() {
        for len in [0usize, 1, 7, 8, 9, 768, 1001] {
            let r: Vec<f32> = (0..len)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) / 7.0)
                .collect();
            let want: f64 = r.iter().map(|&v| (v as f64) * (v as f64)).sum();
            assert!(
                (sq_norm(&r) as f64 - want).abs() <= 1e-5 * want.max(1.0),
                "{len}"
            );
        }
    }

    #[test]
    fn gemm_matches_naive() {
        let (m, n, d) = (7, 5, 13);
        let a: Vec<f32> = (0..m * d)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let b: Vec<f32> = (0..n * d)
            .map(|i| ((i * 17 % 7) as f32 - 3.0) / 2.0)
            .collect();
        for par in [false, true] {
            let mut out = vec![f32::NAN; m * n];
            matmul_abt(&a, m, &b, n, d, &mut out, par).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let r: f32 = (0..d).map(|p| a[i * d + p] * b[j * d + p]).sum();
                    assert!((out[i * n + j] - r).abs() < 1e-4, "{i} {j}");
                }
            }
        }
        assert!(matmul_abt(&a, m + 1, &b, n, d, &mut [0.0; 35], false).is_err());
    }
}
