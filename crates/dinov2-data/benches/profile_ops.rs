//! Per-operation timing of the augmentation building blocks on one decoded image (development aid).
//!
//! `cargo bench -p dinov2-data --bench profile_ops -- [<image>]` (without an image: a synthetic 500x375 JPEG).

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
    // `cargo bench` appends `--bench`: flags are not ours
    let path = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let bytes = match &path {
        Some(p) => std::fs::read(p)?,
        None => {
            let img = dinov2_data::image::RgbImage::from_fn(500, 375, |x, y| {
                dinov2_data::image::Rgb([
                    (x * 7 % 256) as u8,
                    (y * 5 % 256) as u8,
                    ((x ^ y) % 256) as u8,
                ])
            });
            let mut jpeg = Vec::new();
            dinov2_data::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
                .encode_image(&img)?;
            jpeg
        }
    };
    time("decode", 10, || {
        let _ = dinov2_data::decode_rgb(&bytes, &Default::default());
    });
    let img = dinov2_data::decode_rgb(&bytes, &Default::default())?;
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
