//! Pixel parity of the deterministic transforms against torchvision/PIL fixtures (`tools/make_data_fixtures.py`).

mod common;

use common::{load_png, max_diff, n_diff, Fixtures};
use dinov2_data::transforms::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, gaussian_blur, hflip,
    solarize, to_grayscale, JitterOp, JitterParams,
};

fn check(name: &str, ours: &image::RgbImage, fx: &Fixtures, tol: u8) {
    let e = fx.rgb(name);
    let d = max_diff(ours, &e);
    assert!(
        d <= tol,
        "{name}: max diff {d} (> {tol}), {} differing values",
        n_diff(ours, &e)
    );
}

#[test]
fn flip_grayscale_solarize_are_exact() {
    let fx = Fixtures::open("transforms.safetensors");
    let src = load_png("src_61x47.png");
    let mut a = src.clone();
    hflip(&mut a);
    check("hflip", &a, &fx, 0);
    let mut a = src.clone();
    to_grayscale(&mut a);
    check("grayscale", &a, &fx, 0);
    let mut a = src.clone();
    solarize(&mut a, 128);
    check("solarize_128", &a, &fx, 0);
}

#[test]
fn jitter_ops_are_exact() {
    let fx = Fixtures::open("transforms.safetensors");
    let src = load_png("src_61x47.png");
    for f in ["0.6", "0.77", "1.3", "1.4"] {
        let v: f64 = f.parse().unwrap();
        let mut a = src.clone();
        adjust_brightness(&mut a, v);
        check(&format!("brightness_{f}"), &a, &fx, 0);
        let mut a = src.clone();
        adjust_contrast(&mut a, v);
        check(&format!("contrast_{f}"), &a, &fx, 0);
    }
    for f in ["0.8", "0.93", "1.11", "1.2"] {
        let mut a = src.clone();
        adjust_saturation(&mut a, f.parse().unwrap());
        check(&format!("saturation_{f}"), &a, &fx, 0);
    }
    for f in ["-0.1", "-0.037", "0.0", "0.05", "0.1"] {
        let mut a = src.clone();
        adjust_hue(&mut a, f.parse().unwrap());
        check(&format!("hue_{f}"), &a, &fx, 0);
    }
    // a full ColorJitter with fixed factors and a fixed order
    let p = JitterParams {
        order: [
            JitterOp::Contrast,
            JitterOp::Hue,
            JitterOp::Brightness,
            JitterOp::Saturation,
        ],
        brightness: 0.8,
        contrast: 1.2,
        saturation: 1.1,
        hue: -0.05,
    };
    let mut a = src.clone();
    p.apply(&mut a);
    check("jitter_chain_c1.2_h-0.05_b0.8_s1.1", &a, &fx, 0);
}

#[test]
fn gaussian_blur_within_one_level() {
    // torchvision convolves with the 2-D kernel in f32, we convolve separably in f32: float rounding may flip a
    // .5 rounding, hence a tolerance of one level (1/255), and it must be rare.
    let fx = Fixtures::open("transforms.safetensors");
    let src = load_png("src_61x47.png");
    for s in ["0.1", "0.7", "1.3", "2.0"] {
        let b = gaussian_blur(&src, 9, s.parse().unwrap());
        let e = fx.rgb(&format!("blur_{s}"));
        assert!(max_diff(&b, &e) <= 1, "blur {s}: {}", max_diff(&b, &e));
        assert!(
            n_diff(&b, &e) * 100 <= b.as_raw().len(),
            "blur {s}: {} values differ",
            n_diff(&b, &e)
        );
    }
}
