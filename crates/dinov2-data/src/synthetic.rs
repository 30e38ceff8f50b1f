//! A labelled image dataset drawn on the fly: ten shape classes under random colours, positions, sizes and
//! rotations, for training and evaluating on machines without a dataset on disk.
//!
//! The class of an image is its shape ([`CLASSES`]); everything a network could latch onto without understanding
//! shape varies independently of the class: the object and background colours (any hue, saturation and brightness,
//! with enough luminance contrast that the shape survives grayscale), the background's brightness gradient, the
//! object's position, size, rotation and aspect, and per-pixel noise. A randomly initialised network sees mostly
//! colour and brightness, so its features separate the classes poorly; self-supervised training with colour jitter,
//! grayscale and multi-crop learns to ignore those factors and to see the shapes.
//!
//! Images are rendered with 4x4 supersampling (antialiased edges), deterministically in `(seed, index)`: the same
//! dataset gives the same pixels on every machine and at every call, and two seeds give independent splits. Labels
//! cycle through the classes (`index % 10`), so every prefix of the dataset is balanced to within one image.
//!
//! ```
//! use dinov2_data::synthetic::{SyntheticShapes, CLASSES};
//! use dinov2_data::{Dataset, DecodeOptions};
//! let train = SyntheticShapes::new(1000, 0);
//! let test = SyntheticShapes::new(500, 1); // another seed: an independent test split
//! let s = train.get(13, &DecodeOptions::default())?;
//! assert_eq!(s.image.dimensions(), (32, 32));
//! assert_eq!((s.label, CLASSES[3]), (Some(3), "disc"));
//! assert_eq!(s, train.get(13, &DecodeOptions::default())?); // deterministic
//! assert_ne!(s.image, test.get(13, &DecodeOptions::default())?.image);
//! # Ok::<(), dinov2_data::Error>(())
//! ```

use std::f32::consts::{PI, TAU};
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dataset::{Dataset, Sample};
use crate::decode::DecodeOptions;
use crate::error::{Error, Result};
use crate::sampler::mix_seed;

/// The class names, in label order (label = position). They are sorted, so an image folder written by
/// [`SyntheticShapes::write_image_folder`] and read back with
/// [`FileDataset::image_folder`](crate::FileDataset::image_folder) has the same labels.
pub const CLASSES: [&str; 10] = [
    "checker", "crescent", "cross", "disc", "ring", "square", "star", "stripes", "triangle",
    "two_dots",
];

/// Default image side in pixels (see [`SyntheticShapes::new`]).
pub const DEFAULT_IMAGE_SIZE: u32 = 32;

/// Smallest image side [`SyntheticShapes::with_image_size`] accepts: below it the shapes are a few pixels wide.
pub const MIN_IMAGE_SIZE: u32 = 16;

/// Largest image side [`SyntheticShapes::with_image_size`] accepts.
pub const MAX_IMAGE_SIZE: u32 = 1024;

/// Subsamples per pixel side (antialiasing).
const SUPERSAMPLE: usize = 4;

/// Tag mixed into the per-image seed, so that these streams differ from other users of the same seed.
const STREAM_TAG: u64 = 0x5348_4150_4553; // "SHAPES"

/// The shape dataset (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticShapes {
    len: usize,
    seed: u64,
    image_size: u32,
    class_colours: bool,
}

impl SyntheticShapes {
    /// `len` images of [`DEFAULT_IMAGE_SIZE`] pixels, drawn from `seed` (example: [module docs](self)).
    ///
    /// 32 pixels is as small as the shapes stay recognisable after the training crops (a global crop of scale 0.32
    /// still holds most of an 18-pixel window, a local crop a part of the shape), with a 4x4 grid of 8-pixel
    /// patches: cheap enough to pretrain a small ViT on two CPU cores in minutes.
    pub fn new(len: usize, seed: u64) -> Self {
        Self {
            len,
            seed,
            image_size: DEFAULT_IMAGE_SIZE,
            class_colours: false,
        }
    }

    /// The same dataset with the object's hue given by its class (ten hues a tenth of the circle apart, a little
    /// jitter; saturation and brightness still random) on a dark, weakly coloured background: shape and colour
    /// family both identify the class. Colour is what the views of one image share most, so self-supervised
    /// training picks it up within a few hundred steps (the main job); the default, class-independent colours
    /// make the shapes the only signal, a much harder task.
    ///
    /// ```
    /// use dinov2_data::synthetic::SyntheticShapes;
    /// let plain = SyntheticShapes::new(10, 0);
    /// let coloured = SyntheticShapes::new(10, 0).with_class_colours();
    /// assert_ne!(plain.render(3)?, coloured.render(3)?);
    /// assert_eq!(coloured.render(3)?, coloured.render(3)?);
    /// # Ok::<(), dinov2_data::Error>(())
    /// ```
    pub fn with_class_colours(mut self) -> Self {
        self.class_colours = true;
        self
    }

    /// The same dataset with square images of `size` pixels (the scene scales with it).
    ///
    /// Errors: [`Error::InvalidConfig`] when `size` is outside [`MIN_IMAGE_SIZE`]..=[`MAX_IMAGE_SIZE`].
    ///
    /// ```
    /// use dinov2_data::synthetic::SyntheticShapes;
    /// use dinov2_data::{Dataset, DecodeOptions};
    /// let ds = SyntheticShapes::new(4, 0).with_image_size(48)?;
    /// assert_eq!(ds.get(0, &DecodeOptions::default())?.image.dimensions(), (48, 48));
    /// assert!(SyntheticShapes::new(4, 0).with_image_size(8).is_err());
    /// # Ok::<(), dinov2_data::Error>(())
    /// ```
    pub fn with_image_size(mut self, size: u32) -> Result<Self> {
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&size) {
            return Err(Error::config(
                "image_size",
                format!("{size} is outside {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE} pixels"),
            ));
        }
        self.image_size = size;
        Ok(self)
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The image side in pixels.
    pub fn image_size(&self) -> u32 {
        self.image_size
    }

    /// Label of image `index` (it cycles through [`CLASSES`]), without rendering it.
    ///
    /// ```
    /// use dinov2_data::synthetic::SyntheticShapes;
    /// let ds = SyntheticShapes::new(25, 0);
    /// assert_eq!((ds.class_of(0), ds.class_of(12), ds.class_of(25)), (Some(0), Some(2), None));
    /// ```
    pub fn class_of(&self, index: usize) -> Option<usize> {
        (index < self.len).then_some(index % CLASSES.len())
    }

    /// Renders image `index` (what [`Dataset::get`] returns, without the label).
    ///
    /// Errors: [`Error::IndexOutOfRange`].
    ///
    /// ```
    /// use dinov2_data::synthetic::SyntheticShapes;
    /// let ds = SyntheticShapes::new(10, 3);
    /// let img = ds.render(9)?;
    /// assert_eq!(img, ds.render(9)?);
    /// assert!(ds.render(10).is_err());
    /// # Ok::<(), dinov2_data::Error>(())
    /// ```
    pub fn render(&self, index: usize) -> Result<RgbImage> {
        let class = self.class_of(index).ok_or(Error::IndexOutOfRange {
            index,
            len: self.len,
        })?;
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[STREAM_TAG, self.seed, index as u64]));
        let hue = self
            .class_colours
            .then(|| class as f32 / CLASSES.len() as f32);
        Ok(Scene::sample(Shape::ALL[class], hue, self.image_size, &mut rng).draw(&mut rng))
    }

    /// Writes the dataset as an image folder, `root/<class>/<index>.png` (index zero-padded to the width of the
    /// largest), the layout of torchvision's `ImageFolder`, so `dinov2 train` and every image-folder reader can use
    /// it. Each file is written to a temporary name in its folder, then renamed: an interrupted run leaves whole
    /// images only. Existing files of the same names are replaced; other files are left alone. Returns the paths
    /// written, in index order.
    ///
    /// Errors: [`Error::Io`] when a folder or file cannot be written, [`Error::Decode`] when encoding fails.
    ///
    /// ```
    /// use dinov2_data::synthetic::{SyntheticShapes, CLASSES};
    /// use dinov2_data::{Dataset, DecodeOptions, FileDataset};
    /// let dir = tempfile::tempdir()?;
    /// let ds = SyntheticShapes::new(20, 0);
    /// let paths = ds.write_image_folder(dir.path())?;
    /// assert!(paths[11].ends_with("crescent/11.png"));
    /// let back = FileDataset::image_folder(dir.path())?;
    /// assert_eq!(back.classes, CLASSES.map(String::from));
    /// let i = back.entries.iter().position(|(p, _)| p == &paths[11]).unwrap();
    /// assert_eq!(back.get(i, &DecodeOptions::default())?, ds.get(11, &DecodeOptions::default())?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_image_folder(&self, root: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let root = root.as_ref();
        for class in CLASSES {
            let dir = root.join(class);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let width = self.len.saturating_sub(1).to_string().len();
        (0..self.len)
            .map(|i| {
                let class = CLASSES[i % CLASSES.len()];
                let path = root.join(class).join(format!("{i:0width$}.png"));
                let mut png = Vec::new();
                self.render(i)?
                    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .map_err(|e| Error::Decode {
                        path: Some(path.clone()),
                        reason: format!("cannot encode PNG: {e}"),
                    })?;
                write_atomic(&path, &png)?;
                Ok(path)
            })
            .collect()
    }
}

/// Writes `bytes` to a temporary file next to `path`, then renames it onto `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let res = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| Error::io(path, e))
}

impl Dataset for SyntheticShapes {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize, _opts: &DecodeOptions) -> Result<Sample> {
        Ok(Sample {
            image: self.render(index)?,
            label: Some((index % CLASSES.len()) as i64),
        })
    }
    fn describe(&self, index: usize) -> String {
        match self.class_of(index) {
            Some(c) => format!(
                "synthetic shape #{index} (seed {}, {})",
                self.seed, CLASSES[c]
            ),
            None => format!("synthetic shape #{index} (out of range)"),
        }
    }
    fn label(&self, index: usize) -> Option<i64> {
        self.class_of(index).map(|c| c as i64)
    }
}

/// The shape classes, in [`CLASSES`] order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Checker,
    Crescent,
    Cross,
    Disc,
    Ring,
    Square,
    Star,
    Stripes,
    Triangle,
    TwoDots,
}

impl Shape {
    const ALL: [Shape; 10] = [
        Shape::Checker,
        Shape::Crescent,
        Shape::Cross,
        Shape::Disc,
        Shape::Ring,
        Shape::Square,
        Shape::Star,
        Shape::Stripes,
        Shape::Triangle,
        Shape::TwoDots,
    ];

    /// Whether the point `(u, v)` of the shape's own frame (the shape fits in the unit disc) is inside.
    fn contains(self, u: f32, v: f32) -> bool {
        let r2 = u * u + v * v;
        let in_square = |h: f32| u.abs() <= h && v.abs() <= h;
        match self {
            Shape::Disc => r2 <= 0.85 * 0.85,
            Shape::Ring => (0.5 * 0.5..=1.0).contains(&r2),
            Shape::Square => in_square(0.72),
            Shape::Triangle => {
                // equilateral, circumradius 1: inside the three edges at distance 0.5 from the centre
                (0..3).all(|k| {
                    let a = PI / 2.0 + k as f32 * TAU / 3.0;
                    -(u * a.cos() + v * a.sin()) <= 0.5
                })
            }
            Shape::Cross => {
                let (au, av) = (u.abs(), v.abs());
                (au <= 0.28 && av <= 0.95) || (av <= 0.28 && au <= 0.95)
            }
            Shape::Star => {
                // five points: radius interpolated between the tips (1.0) and the notches (0.42)
                let t = (v.atan2(u) / TAU * 5.0).rem_euclid(1.0);
                let tip = 1.0 - 2.0 * (t - 0.5).abs(); // 1 at a tip, 0 at a notch
                r2.sqrt() <= 0.42 + 0.58 * tip
            }
            Shape::Crescent => r2 <= 0.9 * 0.9 && (u - 0.45).powi(2) + v * v > 0.75 * 0.75,
            Shape::TwoDots => (u.abs() - 0.55).powi(2) + v * v <= 0.38 * 0.38,
            Shape::Stripes => in_square(0.8) && ((u + 0.8) / 0.32).floor() as i32 % 2 == 0,
            Shape::Checker => {
                in_square(0.81) && {
                    let cell = |x: f32| ((x + 0.81) / 0.54).floor() as i32;
                    (cell(u) + cell(v)) % 2 == 0
                }
            }
        }
    }
}

/// Everything random about one image.
struct Scene {
    shape: Shape,
    size: f32,
    fg: [f32; 3],
    bg: [f32; 3],
    /// Background brightness gradient: direction (unit vector) and amplitude across the image.
    gradient: ([f32; 2], f32),
    /// Centre in pixels.
    centre: [f32; 2],
    /// Half-extents of the shape's unit disc along its two axes, in pixels.
    radius: [f32; 2],
    /// Rotation (cos, sin).
    rotation: [f32; 2],
    /// Amplitude of the uniform per-pixel noise.
    noise: f32,
}

/// Luminance (ITU-R 601, as `to_grayscale`) of a colour in `[0, 1]`.
fn luminance(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// HSV (each in `[0, 1]`) to RGB in `[0, 1]`.
fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let f = |n: f32| {
        let k = (n + h * 6.0) % 6.0;
        v - v * s * k.min(4.0 - k).clamp(0.0, 1.0)
    };
    [f(5.0), f(3.0), f(1.0)]
}

impl Scene {
    /// Least luminance difference between object and background (the shape must survive grayscale).
    const MIN_CONTRAST: f32 = 0.25;

    fn sample(shape: Shape, class_hue: Option<f32>, image_size: u32, rng: &mut ChaCha8Rng) -> Self {
        let size = image_size as f32;
        let (mut fg, mut bg) = Self::colours(class_hue, rng);
        let mut tries = 0;
        while (luminance(fg) - luminance(bg)).abs() < Self::MIN_CONTRAST {
            tries += 1;
            (fg, bg) = if tries < 1000 {
                Self::colours(class_hue, rng)
            } else {
                ([1.0; 3], [0.0; 3])
            };
        }
        let angle: f32 = rng.random_range(0.0..TAU);
        let gradient = ([angle.cos(), angle.sin()], rng.random_range(0.0..0.3));
        let scale = size * rng.random_range(0.26..0.42f32);
        let aspect = rng.random_range(0.8..1.25f32).sqrt();
        let radius = [scale * aspect, scale / aspect];
        // the centre keeps most of the shape inside the image
        let margin = 0.8 * scale;
        let mut centre = [0.0; 2];
        for c in &mut centre {
            *c = rng.random_range(margin..(size - margin).max(margin + 1e-3));
        }
        let rot: f32 = rng.random_range(0.0..TAU);
        Scene {
            shape,
            size,
            fg,
            bg,
            gradient,
            centre,
            radius,
            rotation: [rot.cos(), rot.sin()],
            noise: rng.random_range(0.0..0.08),
        }
    }

    /// Object and background colours: any colour each, or (with a class hue) the class's hue on a dark
    /// background.
    fn colours(class_hue: Option<f32>, rng: &mut ChaCha8Rng) -> ([f32; 3], [f32; 3]) {
        match class_hue {
            None => {
                let mut colour = || {
                    hsv(
                        rng.random(),
                        rng.random_range(0.0..1.0f32).sqrt(),
                        rng.random_range(0.08..1.0),
                    )
                };
                (colour(), colour())
            }
            Some(h) => {
                let hue = (h + rng.random_range(-0.03..0.03f32)).rem_euclid(1.0);
                let fg = hsv(hue, rng.random_range(0.6..1.0), rng.random_range(0.75..1.0));
                let bg = hsv(
                    rng.random(),
                    rng.random_range(0.0..0.25),
                    rng.random_range(0.0..0.3),
                );
                (fg, bg)
            }
        }
    }

    /// Fraction of the pixel `(x, y)` the shape covers (4x4 subsamples).
    fn coverage(&self, x: u32, y: u32) -> f32 {
        let [c, s] = self.rotation;
        let mut hits = 0;
        for i in 0..SUPERSAMPLE {
            for j in 0..SUPERSAMPLE {
                let px = x as f32 + (j as f32 + 0.5) / SUPERSAMPLE as f32 - self.centre[0];
                let py = y as f32 + (i as f32 + 0.5) / SUPERSAMPLE as f32 - self.centre[1];
                let (u, v) = (
                    (c * px + s * py) / self.radius[0],
                    (-s * px + c * py) / self.radius[1],
                );
                hits += usize::from(self.shape.contains(u, v));
            }
        }
        hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32
    }

    fn draw(&self, rng: &mut ChaCha8Rng) -> RgbImage {
        let n = self.size as u32;
        let ([gx, gy], amp) = self.gradient;
        RgbImage::from_fn(n, n, |x, y| {
            let t = ((x as f32 + 0.5) / self.size - 0.5) * gx
                + ((y as f32 + 0.5) / self.size - 0.5) * gy;
            let shade = amp * t;
            let a = self.coverage(x, y);
            let mut px = [0u8; 3];
            for (k, p) in px.iter_mut().enumerate() {
                let bg = self.bg[k] + shade;
                let v =
                    a * self.fg[k] + (1.0 - a) * bg + self.noise * rng.random_range(-1.0..1.0f32);
                *p = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
            Rgb(px)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FileDataset;

    fn opts() -> DecodeOptions {
        DecodeOptions::default()
    }

    #[test]
    fn images_are_deterministic_in_seed_and_index() {
        let a = SyntheticShapes::new(30, 7);
        let b = SyntheticShapes::new(1000, 7); // the length does not enter the pixels
        for i in [0, 1, 17, 29] {
            assert_eq!(a.get(i, &opts()).unwrap(), b.get(i, &opts()).unwrap());
        }
        let other = SyntheticShapes::new(30, 8);
        assert_ne!(a.render(5).unwrap(), other.render(5).unwrap());
        assert_ne!(
            a.render(5).unwrap(),
            a.render(15).unwrap(),
            "same class, another image"
        );
    }

    #[test]
    fn labels_are_balanced_and_agree_with_get() {
        let ds = SyntheticShapes::new(1005, 0);
        let mut counts = [0usize; 10];
        for i in 0..ds.len() {
            let l = ds.label(i).unwrap() as usize;
            counts[l] += 1;
            if i % 97 == 0 {
                assert_eq!(ds.get(i, &opts()).unwrap().label, Some(l as i64));
            }
        }
        assert_eq!(counts, [101, 101, 101, 101, 101, 100, 100, 100, 100, 100]);
        assert_eq!(ds.label(1005), None);
        assert!(matches!(
            ds.get(1005, &opts()),
            Err(Error::IndexOutOfRange {
                index: 1005,
                len: 1005
            })
        ));
        assert!(ds.describe(4).contains("ring"));
    }

    /// Coverage of the shape alone (no colours), on a canonical upright, centred scene.
    fn mask(shape: Shape) -> Vec<f32> {
        let scene = Scene {
            shape,
            size: 32.0,
            fg: [1.0; 3],
            bg: [0.0; 3],
            gradient: ([1.0, 0.0], 0.0),
            centre: [16.0, 16.0],
            radius: [12.0, 12.0],
            rotation: [1.0, 0.0],
            noise: 0.0,
        };
        (0..32 * 32)
            .map(|i| scene.coverage(i % 32, i / 32))
            .collect()
    }

    #[test]
    fn every_class_draws_a_distinct_visible_shape() {
        let masks: Vec<Vec<f32>> = Shape::ALL.iter().map(|&s| mask(s)).collect();
        for (c, m) in masks.iter().enumerate() {
            let area: f32 = m.iter().sum::<f32>() / (32.0 * 32.0);
            assert!(
                (0.08..0.6).contains(&area),
                "{}: area fraction {area}",
                CLASSES[c]
            );
            for (d, other) in masks.iter().enumerate().skip(c + 1) {
                let diff: f32 = m.iter().zip(other).map(|(a, b)| (a - b).abs()).sum();
                assert!(
                    diff > 40.0,
                    "{} and {} differ in {diff} pixels only",
                    CLASSES[c],
                    CLASSES[d]
                );
            }
        }
    }

    #[test]
    fn object_and_background_contrast_in_grayscale() {
        let ds = SyntheticShapes::new(200, 3);
        for i in 0..ds.len() {
            let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[STREAM_TAG, 3, i as u64]));
            let scene = Scene::sample(Shape::ALL[i % 10], None, 32, &mut rng);
            assert!((luminance(scene.fg) - luminance(scene.bg)).abs() >= Scene::MIN_CONTRAST);
            let covered = (0..32 * 32)
                .filter(|&p| scene.coverage(p % 32, p / 32) > 0.5)
                .count();
            assert!(
                covered >= 20,
                "image {i} ({}) shows {covered} object pixels",
                CLASSES[i % 10]
            );
        }
    }

    #[test]
    fn colours_do_not_depend_on_the_class() {
        // mean brightness per class over many images: all classes span dark and bright images alike
        let ds = SyntheticShapes::new(400, 1);
        let mut per_class = vec![Vec::new(); 10];
        for i in 0..ds.len() {
            let img = ds.render(i).unwrap();
            let mean = img
                .pixels()
                .map(|p| f32::from(crate::transforms::luma(&p.0)))
                .sum::<f32>()
                / 1024.0;
            per_class[i % 10].push(mean);
        }
        for (c, means) in per_class.iter().enumerate() {
            let (lo, hi) = means
                .iter()
                .fold((255f32, 0f32), |(a, b), &m| (a.min(m), b.max(m)));
            assert!(
                lo < 64.0 && hi > 150.0,
                "{}: mean brightness only spans {lo}..{hi}",
                CLASSES[c]
            );
        }
    }

    #[test]
    fn image_size_is_validated_and_scales_the_scene() {
        for bad in [0, MIN_IMAGE_SIZE - 1, MAX_IMAGE_SIZE + 1] {
            assert!(matches!(
                SyntheticShapes::new(1, 0).with_image_size(bad),
                Err(Error::InvalidConfig {
                    field: "image_size",
                    ..
                })
            ));
        }
        let big = SyntheticShapes::new(1, 0).with_image_size(64).unwrap();
        assert_eq!(big.render(0).unwrap().dimensions(), (64, 64));
    }

    #[test]
    fn image_folder_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ds = SyntheticShapes::new(23, 5);
        let paths = ds.write_image_folder(dir.path()).unwrap();
        assert_eq!(paths.len(), 23);
        assert!(paths[7].ends_with("stripes/07.png"));
        // writing again replaces the files and leaves no temporary file behind
        ds.write_image_folder(dir.path()).unwrap();
        let back = FileDataset::image_folder(dir.path()).unwrap();
        assert_eq!(back.len(), 23);
        for (path, label) in &back.entries {
            let i: usize = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            assert_eq!(*label, Some(i as i64 % 10));
            let decoded = crate::load_rgb(path).unwrap();
            assert_eq!(decoded, ds.render(i).unwrap(), "{}", path.display());
        }
        for class in CLASSES {
            for e in std::fs::read_dir(dir.path().join(class)).unwrap() {
                let name = e.unwrap().file_name();
                assert!(
                    name.to_string_lossy().ends_with(".png"),
                    "{name:?} left behind"
                );
            }
        }
    }
}
