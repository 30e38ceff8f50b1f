//! Shared helpers of the integration tests: fixture loading.
#![allow(dead_code)]

use std::path::PathBuf;

use safetensors::SafeTensors;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

pub struct Fixtures {
    bytes: Vec<u8>,
}

impl Fixtures {
    pub fn open(name: &str) -> Self {
        let p = fixture(name);
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        Self { bytes }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    pub fn names(&self) -> Vec<String> {
        self.st()
            .names()
            .into_iter()
            .map(|s| s.to_string())
            .collect()
    }
    /// (shape, raw little-endian bytes) of a tensor, checking its dtype.
    fn raw(&self, name: &str, dtype: safetensors::Dtype) -> (Vec<usize>, Vec<u8>) {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), dtype, "{name}");
        (t.shape().to_vec(), t.data().to_vec())
    }
    /// (shape, bytes) of a u8 tensor.
    pub fn u8(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        self.raw(name, safetensors::Dtype::U8)
    }
    /// Little-endian numbers of width `W` decoded with `from_le`.
    fn numbers<const W: usize, T>(
        &self,
        name: &str,
        dtype: safetensors::Dtype,
        from_le: fn([u8; W]) -> T,
    ) -> (Vec<usize>, Vec<T>) {
        let (shape, b) = self.raw(name, dtype);
        let v = b.chunks_exact(W).map(|b| from_le(b.try_into().unwrap()));
        (shape, v.collect())
    }
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        self.numbers(name, safetensors::Dtype::F32, f32::from_le_bytes)
    }
    pub fn f64(&self, name: &str) -> (Vec<usize>, Vec<f64>) {
        self.numbers(name, safetensors::Dtype::F64, f64::from_le_bytes)
    }
    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        self.numbers(name, safetensors::Dtype::I64, i64::from_le_bytes)
    }
    pub fn rgb(&self, name: &str) -> image::RgbImage {
        let (shape, data) = self.u8(name);
        assert_eq!(shape.len(), 3, "{name}");
        assert_eq!(shape[2], 3, "{name}");
        image::RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data).unwrap()
    }
}

pub fn load_png(name: &str) -> image::RgbImage {
    dinov2_data::load_rgb(fixture(name)).unwrap()
}

/// Max absolute difference between two images of the same size (panics on a size mismatch).
pub fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions(), "size mismatch");
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Number of differing bytes.
pub fn n_diff(a: &image::RgbImage, b: &image::RgbImage) -> usize {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .count()
}
