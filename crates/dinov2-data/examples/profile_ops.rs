//! Per-operation timing of the augmentation building blocks on one decoded image (development aid).
//!
//! `cargo run -p dinov2-data --example profile_ops -- <image>`

use std::time::Instant;

use dinov2_data::resize::{resized_crop, CropBox};
use dinov2_data::transforms::*;

fn time<F: FnMut()>(name: &str, n: usize, mut f: F) {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!(
        "{name:>28}: {:8.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let p = std::env::args()
        .nth(1)
        .ok_or("usage: profile_ops <image>")?;
    let bytes = std::fs::read(&p)?;
    time("decode", 10, || {
        let _ = dinov2_data::decode_rgb(&bytes, &Default::default());
    });
    let img = dinov2_data::load_rgb(std::path::Path::new(&p))?;
    let (w, h) = img.dimensions();
    let b = CropBox {
        left: w / 8,
        top: h / 8,
        width: w * 3 / 4,
        height: h * 3 / 4,
    };
    time("resized_crop global 224", 10, || {
        let _ = resized_crop(&img, b, 224, 224);
    });
    let bl = CropBox {
        left: w / 4,
        top: h / 4,
        width: w / 3,
        height: h / 3,
    };
    time("resized_crop local 96", 20, || {
        let _ = resized_crop(&img, bl, 96, 96);
    });
    let c = resized_crop(&img, b, 224, 224);
    time("brightness 224", 20, || {
        adjust_brightness(&mut c.clone(), 1.2)
    });
    time("contrast 224", 20, || adjust_contrast(&mut c.clone(), 1.2));
    time("saturation 224", 20, || {
        adjust_saturation(&mut c.clone(), 1.1)
    });
    time("hue 224", 20, || adjust_hue(&mut c.clone(), 0.05));
    time("grayscale 224", 20, || to_grayscale(&mut c.clone()));
    time("blur 224", 20, || {
        let _ = gaussian_blur(&c, 9, 1.0);
    });
    time("to_tensor 224", 20, || {
        let _ = dinov2_data::to_tensor_normalized(
            &c,
            dinov2_data::IMAGENET_MEAN,
            dinov2_data::IMAGENET_STD,
        );
    });
    Ok(())
}
