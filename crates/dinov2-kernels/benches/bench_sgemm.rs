//! Packed-weight GEMM against the `gemm` crate (what candle and the model used before) on the shapes of
//! DINOv2's linear layers: `cargo bench -p dinov2-kernels --bench bench_sgemm [-- ROUNDS]`.
//! Interleaved rounds, medians, GFLOP/s and the ratio ours/gemm. Threads: `RAYON_NUM_THREADS`.

use std::time::Instant;

use dinov2_kernels::sgemm::{gemm_packed, Output, PackedB, Parallelism};

fn values(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

/// Mean seconds per call of `f` over `reps` calls.
fn seconds_per_call(reps: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let threads = rayon::current_num_threads();
    println!(
        "threads {threads}, rounds {rounds}, AVX2+FMA {}",
        dinov2_kernels::sgemm::has_avx2_fma()
    );
    println!("| shape (m x k x n) | ours GFLOP/s | gemm GFLOP/s | ours/gemm |");
    println!("|---|---|---|---|");
    // (label, m, k, n): ViT-S (d 384), ViT-B (768), ViT-L (1024) at 224 (257 tokens) and batch 16.
    let shapes = [
        ("S qkv b1", 257, 384, 1152),
        ("S fc1 b1", 257, 384, 1536),
        ("S fc2 b1", 257, 1536, 384),
        ("S proj b1", 257, 384, 384),
        ("S qkv b16", 4112, 384, 1152),
        ("S fc2 b16", 4112, 1536, 384),
        ("B qkv b16", 4112, 768, 2304),
        ("B fc1 b16", 4112, 768, 3072),
        ("B fc2 b16", 4112, 3072, 768),
        ("L fc1 b16", 4112, 1024, 4096),
        ("S fc1 518", 1370, 384, 1536),
        // One attention head at 518 px, a block of 48 queries: Q·Kᵀ and P·V.
        ("QK 518", 48, 64, 1370),
        ("PV 518", 48, 1370, 64),
    ];
    for (label, m, k, n) in shapes {
        let a = values(m * k);
        let w = values(n * k);
        let bias = values(n);
        let packed = PackedB::from_weight(&w, n, k).unwrap();
        let mut c = vec![0f32; m * n];
        let reps = ((2e9 / (2.0 * (m * k * n) as f64)) as usize).clamp(2, 200);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            ours.push(seconds_per_call(reps, || {
                let out = Output {
                    data: &mut c,
                    ld: n,
                    accumulate: false,
                    bias: Some(&bias),
                };
                gemm_packed(&a, m, k, &packed, out, None, Parallelism::Rayon).unwrap();
            }));
            theirs.push(seconds_per_call(reps, || {
                // As the model did: bias written first, then the GEMM accumulates into it.
                c.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(&bias));
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        true,
                        a.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr(),
                        k as isize,
                        1,
                        1.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                };
            }));
        }
        let flop = 2.0 * (m * k * n) as f64;
        let (o, t) = (median(ours), median(theirs));
        println!(
            "| {label} ({m} x {k} x {n}) | {:.1} | {:.1} | {:.2} |",
            flop / o / 1e9,
            flop / t / 1e9,
            t / o
        );
    }
}
