//! Pixel parity of decoding, resizing and the eval transform against PIL/torchvision fixtures
//! (made by `tools/make_data_fixtures.py`).

mod common;

use common::{fixture, load_png, max_diff, n_diff, Fixtures};
use dinov2_data::resize::{center_crop, resize_bicubic, resized_crop, shorter_side_size, CropBox};
use dinov2_data::{decode_rgb, load_rgb, preprocess, DecodeOptions, Error, Preprocess};

#[test]
fn pil_bicubic_resize_is_bit_exact() {
    let fx = Fixtures::open("transforms.safetensors");
    let small = load_png("src_61x47.png");
    for (w, h) in [(23u32, 17u32), (97, 131), (61, 20), (5, 47), (1, 1)] {
        let r = resize_bicubic(&small, w, h);
        let e = fx.rgb(&format!("resize_{w}x{h}"));
        assert_eq!(
            n_diff(&r, &e),
            0,
            "resize {w}x{h}: max diff {}",
            max_diff(&r, &e)
        );
    }
}

#[test]
fn resized_crop_with_fixed_box_is_bit_exact() {
    let fx = Fixtures::open("transforms.safetensors");
    let small = load_png("src_61x47.png");
    let big = load_png("src_320x240.png");
    for (top, left, hh, ww, s) in [
        (3u32, 5u32, 30u32, 41u32, 24u32),
        (0, 0, 47, 61, 96),
        (10, 20, 9, 7, 32),
        (100, 37, 130, 250, 96),
    ] {
        let (src, name) = if top + hh > 47 || left + ww > 61 {
            (&big, "big")
        } else {
            (&small, "small")
        };
        let r = resized_crop(
            src,
            CropBox {
                left,
                top,
                width: ww,
                height: hh,
            },
            s,
            s,
        );
        let e = fx.rgb(&format!("rcrop_{name}_{top}_{left}_{hh}_{ww}_{s}"));
        assert_eq!(
            n_diff(&r, &e),
            0,
            "rcrop {top} {left} {hh} {ww}: max diff {}",
            max_diff(&r, &e)
        );
    }
}

#[test]
fn eval_transform_matches_torchvision() {
    let fx = Fixtures::open("transforms.safetensors");
    // Resize(256, bicubic) + CenterCrop(224) on a 320x240 image, before normalisation
    let big = load_png("src_320x240.png");
    let (w, h) = shorter_side_size(320, 240, 256);
    let ours = center_crop(&resize_bicubic(&big, w, h), 224, 224);
    let e = fx.rgb("eval_256_224");
    assert_eq!(max_diff(&ours, &e), 0);
    // tall odd sizes: Resize(40) + CenterCrop(33) of the transposed small image
    let small = load_png("src_61x47.png");
    let tall = image::imageops::flip_horizontal(&image::imageops::rotate90(&small));
    let (w, h) = shorter_side_size(tall.width(), tall.height(), 40);
    let ours = center_crop(&resize_bicubic(&tall, w, h), 33, 33);
    assert_eq!(max_diff(&ours, &fx.rgb("eval_tall_40_33")), 0);
    // complete pipeline incl. ToTensor + Normalize, compared as floats
    let t = preprocess(
        &small,
        &Preprocess::Eval {
            resize: 32,
            crop: 28,
        },
    )
    .unwrap();
    let (shape, e) = fx.f32("eval_norm_32_28");
    assert_eq!(shape, vec![3, 28, 28]);
    assert_eq!(t.shape(), [3, 28, 28]);
    let maxerr = t
        .data
        .iter()
        .zip(&e)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(maxerr <= 1e-6, "normalised eval max error {maxerr}");
    // and the default 256/224 one through `preprocess`
    let t = preprocess(&big, &Preprocess::OFFICIAL_EVAL).unwrap();
    assert_eq!(t.shape(), [3, 224, 224]);
}

#[test]
fn decoding_matches_pil() {
    let fx = Fixtures::open("decode/reference.safetensors");
    let rgb = fx.rgb("rgb");
    // lossless formats: exact
    for f in ["rgb.bmp", "rgb.webp"] {
        let d = load_rgb(fixture(&format!("decode/{f}"))).unwrap();
        assert_eq!(max_diff(&d, &rgb), 0, "{f}");
    }
    let d = load_rgb(fixture("decode/rgba.png")).unwrap();
    assert_eq!(max_diff(&d, &rgb), 0, "rgba.png");
    assert_eq!(
        max_diff(
            &load_rgb(fixture("decode/grey.png")).unwrap(),
            &fx.rgb("grey_png")
        ),
        0
    );
    assert_eq!(
        max_diff(
            &load_rgb(fixture("decode/anim.gif")).unwrap(),
            &fx.rgb("anim_gif")
        ),
        0,
        "gif first frame"
    );
    // 16-bit: v16 = 257 * v8, so scaling gives v8 back
    let g16 = load_rgb(fixture("decode/grey16.png")).unwrap();
    let (shape, g8) = fx.u8("grey16_png_as8");
    assert_eq!(g16.dimensions(), (shape[1] as u32, shape[0] as u32));
    for (p, &g) in g16.pixels().zip(&g8) {
        assert_eq!(p.0, [g, g, g]);
    }
    // CMYK TIFF: PIL's naive inversion (r = 255 - c - k clipped), the same formula family as ours, within 1 level
    let d = load_rgb(fixture("decode/cmyk.tif")).unwrap();
    assert!(
        max_diff(&d, &fx.rgb("cmyk_tif")) <= 1,
        "cmyk tif diff {}",
        max_diff(&d, &fx.rgb("cmyk_tif"))
    );
    // lossy JPEG: different IDCT/upsampling implementations (zune-jpeg vs libjpeg-turbo) differ by a few levels
    for (f, k, tol) in [("rgb.jpg", "rgb_jpg", 12u8), ("cmyk.jpg", "cmyk_jpg", 16)] {
        let d = load_rgb(fixture(&format!("decode/{f}"))).unwrap();
        let e = fx.rgb(k);
        let mean: f64 = d
            .as_raw()
            .iter()
            .zip(e.as_raw())
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / d.as_raw().len() as f64;
        assert!(
            max_diff(&d, &e) <= tol && mean < 1.5,
            "{f}: max {} mean {mean}",
            max_diff(&d, &e)
        );
    }
    // EXIF orientation 6: decoded image is the rotated one, as PIL's exif_transpose gives
    let d = load_rgb(fixture("decode/exif6.jpg")).unwrap();
    let e = fx.rgb("exif6_jpg");
    assert_eq!(d.dimensions(), (30, 40));
    assert_eq!(d.dimensions(), e.dimensions());
    let mean: f64 = d
        .as_raw()
        .iter()
        .zip(e.as_raw())
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / d.as_raw().len() as f64;
    assert!(mean < 1.5, "exif mean diff {mean}");
}

#[test]
fn broken_files_give_typed_errors() {
    for f in ["truncated.jpg", "empty.jpg", "notanimage.png"] {
        match load_rgb(fixture(&format!("decode/{f}"))) {
            Err(Error::Decode { path: Some(p), .. }) => assert!(p.ends_with(f)),
            other => panic!("{f}: expected a Decode error with its path, got {other:?}"),
        }
    }
    assert!(matches!(
        load_rgb(fixture("decode/does-not-exist.jpg")),
        Err(Error::Io { .. })
    ));
    let bytes = std::fs::read(fixture("src_320x240.png")).unwrap();
    let o = DecodeOptions {
        max_pixels: 320 * 240 - 1,
        ..Default::default()
    };
    assert!(matches!(
        decode_rgb(&bytes, &o),
        Err(Error::TooManyPixels { .. })
    ));
}
