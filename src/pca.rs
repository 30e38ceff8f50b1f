//! The first three principal components of an image's patch features, as an RGB picture (the figure in the
//! DINOv2 paper and README).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// Top-`k` principal directions of the rows of `x` (`[n, d]`), by subspace iteration on the covariance.
/// Returns `k` unit vectors of length `d`, largest variance first, and the row mean.
pub fn principal_components(
    x: &[f32],
    n: usize,
    d: usize,
    k: usize,
) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
    if n < 2 || d == 0 || x.len() != n * d || k == 0 || k > d {
        bail!("PCA needs at least 2 rows and 0 < k <= d (got n={n}, d={d}, k={k})");
    }
    let mut mean = vec![0f64; d];
    for row in x.chunks_exact(d) {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut cov = vec![0f64; d * d];
    for row in x.chunks_exact(d) {
        let c: Vec<f64> = row.iter().zip(&mean).map(|(&v, m)| v as f64 - m).collect();
        for i in 0..d {
            let ci = c[i];
            cov[i * d..(i + 1) * d]
                .iter_mut()
                .zip(&c)
                .for_each(|(a, &cj)| *a += ci * cj);
        }
    }
    // Subspace iteration with Gram-Schmidt, deterministic start.
    let mut basis: Vec<Vec<f64>> = (0..k)
        .map(|j| {
            (0..d)
                .map(|i| {
                    (((i * 31 + j * 17) % 97) as f64 + 1.0)
                        * if (i + j) % 2 == 0 { 1.0 } else { -1.0 }
                })
                .collect()
        })
        .collect();
    for _ in 0..300 {
        for v in basis.iter_mut() {
            let mut w = vec![0f64; d];
            for i in 0..d {
                w[i] = cov[i * d..(i + 1) * d]
                    .iter()
                    .zip(v.iter())
                    .map(|(a, b)| a * b)
                    .sum();
            }
            *v = w;
        }
        for j in 0..k {
            for p in 0..j {
                let (head, tail) = basis.split_at_mut(j);
                let dot: f64 = head[p].iter().zip(tail[0].iter()).map(|(a, b)| a * b).sum();
                tail[0]
                    .iter_mut()
                    .zip(head[p].iter())
                    .for_each(|(a, b)| *a -= dot * b);
            }
            let norm = basis[j]
                .iter()
                .map(|a| a * a)
                .sum::<f64>()
                .sqrt()
                .max(1e-300);
            basis[j].iter_mut().for_each(|a| *a /= norm);
        }
    }
    Ok((basis, mean))
}

/// Colours each patch by its projection on the first three components (min-max scaled per component) and
/// scales the `h × w` grid up by `cell` pixels per patch.
pub fn pca_image(patch_tokens: &Tensor, grid: (usize, usize), cell: u32) -> Result<RgbImage> {
    let t = patch_tokens.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (n, d) = t.dims2()?;
    let (h, w) = grid;
    if n != h * w {
        bail!("{n} patch tokens do not form a {h}x{w} grid");
    }
    let x = t.flatten_all()?.to_vec1::<f32>()?;
    let (pcs, mean) = principal_components(&x, n, d, 3)?;
    let mut proj = vec![[0f64; 3]; n];
    for (r, row) in x.chunks_exact(d).enumerate() {
        for (c, pc) in pcs.iter().enumerate() {
            proj[r][c] = row
                .iter()
                .zip(&mean)
                .zip(pc)
                .map(|((&v, m), p)| (v as f64 - m) * p)
                .sum();
        }
    }
    let mut lo = [f64::INFINITY; 3];
    let mut hi = [f64::NEG_INFINITY; 3];
    for p in &proj {
        for c in 0..3 {
            lo[c] = lo[c].min(p[c]);
            hi[c] = hi[c].max(p[c]);
        }
    }
    let cell = cell.max(1);
    let mut img = RgbImage::new(w as u32 * cell, h as u32 * cell);
    for (px, py, pixel) in img.enumerate_pixels_mut() {
        let p = proj[(py / cell) as usize * w + (px / cell) as usize];
        for c in 0..3 {
            let v = if hi[c] > lo[c] {
                (p[c] - lo[c]) / (hi[c] - lo[c])
            } else {
                0.5
            };
            pixel[c] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_the_dominant_directions_of_synthetic_data() {
        // Points spread 10x along e0 and 3x along e2, little along the others.
        let (n, d) = (200, 5);
        let mut x = Vec::new();
        for i in 0..n {
            let a = ((i * 37 % 101) as f32 / 50.0) - 1.0;
            let b = ((i * 53 % 89) as f32 / 44.0) - 1.0;
            let c = ((i * 71 % 83) as f32 / 41.0) - 1.0;
            x.extend_from_slice(&[10.0 * a, 0.1 * c, 3.0 * b, 0.05 * a * b, 0.02]);
        }
        let (pcs, _) = principal_components(&x, n, d, 2).unwrap();
        assert!(
            pcs[0][0].abs() > 0.99,
            "first component along e0: {:?}",
            pcs[0]
        );
        assert!(
            pcs[1][2].abs() > 0.99,
            "second component along e2: {:?}",
            pcs[1]
        );
        let dot: f64 = pcs[0].iter().zip(&pcs[1]).map(|(a, b)| a * b).sum();
        assert!(dot.abs() < 1e-9);
    }
}
