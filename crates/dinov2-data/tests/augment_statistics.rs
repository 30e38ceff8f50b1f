//! Statistical tests of the random parts of `DataAugmentationDINO` over >= 10k draws, against the distributions the
//! official code defines (torchvision RandomResizedCrop / RandomApply / ColorJitter, DINOv2 probabilities).
//!
//! Determinism: every stream is a `ChaCha8Rng` with a fixed seed (its output is specified bit for bit, the same on
//! every platform), nothing depends on threads or time, so each run draws exactly the same numbers. The tolerances
//! are what a *different* seed would need: a mean is allowed 5 standard errors (two-sided false alarm 6e-7 per
//! check; a difference of two samples 6 SE), a standard deviation or variance ratio 5 % where its relative standard
//! error is <= 0.7 % (>= 7 SE). With the fixed seeds the largest deviation is 2.0 SE (measured when these bounds were
//! set), so a change of libm rounding in `ln`/`exp` (one crop side off by one pixel now and then) cannot flip them.

use dinov2_data::augment::{BlurProbabilities, CropKind, CropsConfig, DataAugmentationDino};
use dinov2_data::transforms::JitterOp;
use rand::SeedableRng;

const N: usize = 20_000;

fn aug(blur: BlurProbabilities) -> DataAugmentationDino {
    DataAugmentationDino::new(CropsConfig::default(), blur).unwrap()
}

/// |observed - p| within 5 binomial standard errors (exact when p is 0 or 1).
fn assert_rate(name: &str, hits: usize, n: usize, p: f64) {
    let obs = hits as f64 / n as f64;
    let se = (p * (1.0 - p) / n as f64).sqrt().max(1e-12);
    assert!(
        (obs - p).abs() <= 5.0 * se + 1e-12,
        "{name}: observed {obs:.4}, expected {p} (se {se:.4})"
    );
}

#[test]
fn decision_rates_match_official_probabilities() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (blur, probs) in [
        (BlurProbabilities::RELEASED, [0.0, 0.9, 0.5]),
        (BlurProbabilities::INTENDED, [1.0, 0.1, 0.5]),
    ] {
        let a = aug(blur);
        for (kind, p_blur, p_sol) in [
            (CropKind::Global1, probs[0], 0.0),
            (CropKind::Global2, probs[1], 0.2),
            (CropKind::Local, probs[2], 0.0),
        ] {
            let plans: Vec<_> = (0..N)
                .map(|_| a.plan_crop(500, 375, kind, &mut rng))
                .collect();
            let count = |f: &dyn Fn(&dinov2_data::augment::CropPlan) -> bool| {
                plans.iter().filter(|p| f(p)).count()
            };
            assert_rate("flip", count(&|p| p.flip), N, 0.5);
            assert_rate("jitter", count(&|p| p.jitter.is_some()), N, 0.8);
            assert_rate("grayscale", count(&|p| p.grayscale), N, 0.2);
            assert_rate(
                &format!("blur {kind:?}"),
                count(&|p| p.blur_sigma.is_some()),
                N,
                p_blur,
            );
            assert_rate(
                &format!("solarize {kind:?}"),
                count(&|p| p.solarize),
                N,
                p_sol,
            );
            // sigma ~ U(0.1, 2): mean 1.05, var 1.9^2/12
            let s: Vec<f64> = plans
                .iter()
                .filter_map(|p| p.blur_sigma.map(f64::from))
                .collect();
            if s.len() > 1000 {
                let m = s.iter().sum::<f64>() / s.len() as f64;
                let se = (1.9f64.powi(2) / 12.0 / s.len() as f64).sqrt();
                assert!((m - 1.05).abs() < 5.0 * se, "sigma mean {m}");
                assert!(s.iter().all(|&v| (0.1..=2.0).contains(&v)));
            }
        }
    }
}

#[test]
fn jitter_factors_and_order_are_uniform() {
    let a = aug(BlurProbabilities::RELEASED);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let ps: Vec<_> = (0..N).map(|_| a.jitter.sample(&mut rng)).collect();
    for (name, lo, hi, get) in [
        (
            "brightness",
            0.6,
            1.4,
            (|p: &dinov2_data::transforms::JitterParams| p.brightness) as fn(&_) -> f64,
        ),
        ("contrast", 0.6, 1.4, |p| p.contrast),
        ("saturation", 0.8, 1.2, |p| p.saturation),
        ("hue", -0.1, 0.1, |p| p.hue),
    ] {
        let v: Vec<f64> = ps.iter().map(get).collect();
        assert!(v.iter().all(|&x| x >= lo && x <= hi), "{name} out of range");
        let m = v.iter().sum::<f64>() / N as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / N as f64;
        let (em, ev) = ((lo + hi) / 2.0, (hi - lo) * (hi - lo) / 12.0);
        assert!(
            (m - em).abs() < 5.0 * (ev / N as f64).sqrt(),
            "{name} mean {m}"
        );
        // relative SE of the variance of a uniform sample: sqrt((kurtosis 1.8 - 1) / N) = 0.63 %
        assert!((var / ev - 1.0).abs() < 0.05, "{name} var {var} vs {ev}");
    }
    // each op is first with probability 1/4 (uniform permutation)
    for op in [
        JitterOp::Brightness,
        JitterOp::Contrast,
        JitterOp::Saturation,
        JitterOp::Hue,
    ] {
        assert_rate(
            &format!("{op:?} first"),
            ps.iter().filter(|p| p.order[0] == op).count(),
            N,
            0.25,
        );
        assert_rate(
            &format!("{op:?} last"),
            ps.iter().filter(|p| p.order[3] == op).count(),
            N,
            0.25,
        );
    }
}

/// Independent Monte-Carlo of torchvision's RandomResizedCrop.get_params (straight from its definition) to compare
/// the distribution of crop areas and aspect ratios, including the fallback.
fn reference_params(w: f64, h: f64, scale: (f64, f64), rng: &mut impl rand::Rng) -> (f64, f64) {
    let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let ta = w * h * (scale.0 + (scale.1 - scale.0) * rng.random::<f64>());
        let ar = (lr0 + (lr1 - lr0) * rng.random::<f64>()).exp();
        let cw = (ta * ar).sqrt().round_ties_even();
        let ch = (ta / ar).sqrt().round_ties_even();
        if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
            return (cw, ch);
        }
    }
    let r = w / h;
    if r < 0.75 {
        (w, (w / 0.75).round_ties_even())
    } else if r > 4.0 / 3.0 {
        ((h * 4.0 / 3.0).round_ties_even(), h)
    } else {
        (w, h)
    }
}

#[test]
fn crop_scale_and_ratio_distributions() {
    let a = aug(BlurProbabilities::RELEASED);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut rref = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    // a wide image makes the fallback and the rejection matter for the global crops
    for (w, h) in [(500u32, 375u32), (1000, 200)] {
        for (kind, scale) in [
            (CropKind::Global1, (0.32, 1.0)),
            (CropKind::Local, (0.05, 0.32)),
        ] {
            let ours: Vec<(f64, f64)> = (0..N)
                .map(|_| {
                    let p = a.plan_crop(w, h, kind, &mut rng);
                    assert!(p.crop.left + p.crop.width <= w && p.crop.top + p.crop.height <= h);
                    (f64::from(p.crop.width), f64::from(p.crop.height))
                })
                .collect();
            let refs: Vec<(f64, f64)> = (0..N)
                .map(|_| reference_params(f64::from(w), f64::from(h), scale, &mut rref))
                .collect();
            let area = f64::from(w * h);
            let stats = |v: &[(f64, f64)]| {
                let s: Vec<f64> = v.iter().map(|(cw, ch)| cw * ch / area).collect();
                let r: Vec<f64> = v.iter().map(|(cw, ch)| (cw / ch).ln()).collect();
                let m = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
                let sd = |x: &[f64]| {
                    let mm = m(x);
                    (x.iter().map(|v| (v - mm).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
                };
                (m(&s), sd(&s), m(&r), sd(&r))
            };
            let (a1, b1, c1, d1) = stats(&ours);
            let (a2, b2, c2, d2) = stats(&refs);
            // difference of two independent means: 6 SE; sd ratios: relative SE <= sqrt(2 (kurtosis - 1) / 4N) < 0.5 %
            let tol = |sd: f64| 6.0 * sd * (2.0 / N as f64).sqrt();
            assert!(
                (a1 - a2).abs() < tol(b2),
                "{w}x{h} {kind:?} scale mean {a1} vs {a2}"
            );
            assert!(
                (c1 - c2).abs() < tol(d2).max(1e-3),
                "{w}x{h} {kind:?} log-ratio mean {c1} vs {c2}"
            );
            assert!((b1 / b2 - 1.0).abs() < 0.05, "scale sd {b1} vs {b2}");
            // (1000x200 global crops never fit and always take the central fallback: both sds are 0, means exact)
            assert!(
                (d1 / d2.max(1e-9) - 1.0).abs() < 0.05 || d2 < 1e-6,
                "ratio sd {d1} vs {d2}"
            );
        }
    }
}

#[test]
fn augmentation_output_shapes_and_plan_consistency() {
    let a = aug(BlurProbabilities::RELEASED);
    let img = image::RgbImage::from_fn(150, 110, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 2) as u8, 128])
    });
    let out = a.apply(&img, &mut rand_chacha::ChaCha8Rng::seed_from_u64(4));
    assert_eq!(out.global.len(), 2);
    assert_eq!(out.local.len(), 8);
    assert!(out.global.iter().all(|c| c.dimensions() == (224, 224)));
    assert!(out.local.iter().all(|c| c.dimensions() == (96, 96)));
    // apply == plans applied in order with the same stream
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let g1 = a
        .plan_crop(150, 110, CropKind::Global1, &mut rng)
        .apply(&img);
    let g2 = a
        .plan_crop(150, 110, CropKind::Global2, &mut rng)
        .apply(&img);
    assert_eq!(out.global, vec![g1, g2]);
}
