//! `C = A · B (+ C) (+ bias)`, then an optional map over each finished tile, with `B` packed once.
//!
//! The blocking is the usual one (Goto/BLIS) except that `A` is not packed: `k` is cut into blocks of at
//! most [`KC`] rows, `B`'s block into panels of [`NR`] columns (packed at construction: [`PackedB`]), and `A`'s
//! rows into blocks of at most [`MC`] rows read in place. A panel of `B` (`KC × NR`, 16 KiB) stays in L1 while
//! the micro-kernel walks the block's rows of `A` (`MC × KC`, in L2) [`MR`] at a time, broadcasting from each
//! row. Not packing `A` saves a strided copy per product, which is what dominates when `n` is small (the
//! `P · V` of attention, `n` = 64). Threads split the rows (and the columns when there are fewer row blocks
//! than threads) and write disjoint tiles.
//!
//! Results do not depend on the thread count: every output element is summed in the same order (over `k`
//! blocks in order, within a block in order) whatever the split.

use std::fmt;

use rayon::prelude::*;

/// Rows of the micro-tile.
pub const MR: usize = 6;
/// Columns of the micro-tile (two 8-lane AVX2 registers).
pub const NR: usize = 16;
/// Largest block of `k` (the `B` panel of one block is `KC × NR` floats = 16 KiB, half of L1).
pub const KC: usize = 256;
/// Largest block of rows of `A` one thread works on (`MC × KC` floats = 144 KiB, in L2).
pub const MC: usize = 144;

/// Operands whose sizes do not fit together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sgemm: {}", self.0)
    }
}

impl std::error::Error for ShapeError {}

/// How a product may use threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallelism {
    /// On the calling thread only (e.g. inside a parallel loop of the caller's).
    None,
    /// On the current rayon pool.
    Rayon,
}

/// One `k`-row of one panel: `NR` floats on a cache line.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Row([f32; NR]);

/// The right-hand side `B` (`k × n`) in the micro-kernel's layout: for each block of at most [`KC`] rows of
/// `k`, for each panel of [`NR`] columns, the block's rows of that panel one after another (columns past `n`
/// are zero).
///
/// Pack once and reuse: the weights of a layer at load time, the centroids of one k-means iteration.
///
/// ```
/// use dinov2_kernels::PackedB;
/// let w = vec![0f32; 24 * 300]; // a linear layer's weight: 24 outputs, 300 inputs
/// let b = PackedB::from_weight(&w, 24, 300).unwrap();
/// assert_eq!((b.k(), b.n()), (300, 24));
/// // Two panels of 16 columns, the second half zero (or the plain 24 × 300 copy under `Backend::Gemm`).
/// assert!([2 * 300 * 16 * 4, 24 * 300 * 4].contains(&b.memory_bytes()));
/// ```
#[derive(Clone, Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    kc: usize,
    panels: usize,
    rows: Vec<Row>,
    /// Row-major `[k, n]` instead of panels, for the `gemm` crate's kernels (see [`Backend`]).
    plain: Option<Vec<f32>>,
}

/// Which micro-kernels run the products.
///
/// Chosen once per process: `DINOV2_SGEMM=panels|gemm` in the environment, else [`Backend::Panels`] on CPUs
/// without AVX-512 and [`Backend::Gemm`] on CPUs with AVX-512F, whose `gemm` crate kernels (`x86-v4`) use the
/// 512-bit registers our AVX2 micro-kernel does not (not measured against each other on such a CPU yet: the
/// variable lets one do so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Our micro-kernels on `B` packed into panels (AVX2+FMA, or portable Rust).
    Panels,
    /// The `gemm` crate on `B` stored row-major, epilogues applied around it.
    Gemm,
}

/// The backend of this process (see [`Backend`]).
pub fn backend() -> Backend {
    static CHOICE: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
    #[cfg(test)]
    if let Some(b) = FORCE_BACKEND.with(|f| f.get()) {
        return b;
    }
    *CHOICE.get_or_init(|| match std::env::var("DINOV2_SGEMM").as_deref() {
        Ok("panels") => Backend::Panels,
        Ok("gemm") => Backend::Gemm,
        _ if has_avx512f() => Backend::Gemm,
        _ => Backend::Panels,
    })
}

/// Whether this CPU has AVX-512F.
pub fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl fmt::Debug for PackedB {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackedB")
            .field("k", &self.k)
            .field("n", &self.n)
            .field("kc", &self.kc)
            .finish_non_exhaustive()
    }
}

impl PackedB {
    /// `B = wᵀ` for `w` of shape `[n, k]` (row-major): a linear layer's weight `[out, in]`, or the rows of a
    /// database whose dot products with the rows of `A` are wanted.
    pub fn from_weight(w: &[f32], n: usize, k: usize) -> Result<Self, ShapeError> {
        check_len("weight", w.len(), n, k)?;
        let mut b = PackedB::default();
        b.repack_strided(w, k, n, 1, k)?;
        Ok(b)
    }

    /// `B` given row-major as `[k, n]`.
    pub fn from_kn(b_kn: &[f32], k: usize, n: usize) -> Result<Self, ShapeError> {
        check_len("B", b_kn.len(), k, n)?;
        let mut b = PackedB::default();
        b.repack_strided(b_kn, k, n, n, 1)?;
        Ok(b)
    }

    /// Packs `B[p][j] = src[p · row_stride + j · col_stride]` (`k × n`) into `self`, reusing its allocation:
    /// the keys (`row_stride = 1`) or values (`col_stride = 1`) of one attention head inside a qkv matrix.
    ///
    /// ```
    /// use dinov2_kernels::PackedB;
    /// let qkv = [1f32, 2., 3., 4., 5., 6.]; // 2 rows of 3
    /// let mut b = PackedB::default();
    /// b.repack_strided(&qkv[1..], 2, 2, 3, 1).unwrap(); // columns 1..3 of both rows
    /// assert_eq!(b.to_kn(), [2., 3., 5., 6.]);
    /// b.repack_strided(&qkv, 2, 2, 1, 3).unwrap(); // the first two columns, transposed
    /// assert_eq!(b.to_kn(), [1., 4., 2., 5.]);
    /// ```
    pub fn repack_strided(
        &mut self,
        src: &[f32],
        k: usize,
        n: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<(), ShapeError> {
        let last = match (k.checked_sub(1), n.checked_sub(1)) {
            (Some(p), Some(j)) => p
                .checked_mul(row_stride)
                .and_then(|r| j.checked_mul(col_stride).and_then(|c| r.checked_add(c))),
            _ => Some(0),
        };
        if k > 0 && n > 0 && last.is_none_or(|l| l >= src.len()) {
            return Err(ShapeError(format!(
                "a {k} x {n} matrix with strides ({row_stride}, {col_stride}) does not fit in {} values",
                src.len()
            )));
        }
        if backend() == Backend::Gemm {
            let plain = self.plain.get_or_insert_with(Vec::new);
            plain.clear();
            plain.reserve(k * n);
            for p in 0..k {
                plain.extend((0..n).map(|j| src[p * row_stride + j * col_stride]));
            }
            (self.k, self.n, self.kc, self.panels) = (k, n, k.max(1), 0);
            self.rows.clear();
            return Ok(());
        }
        self.plain = None;
        let blocks = k.div_ceil(KC).max(1);
        let kc = k.div_ceil(blocks).max(1);
        let panels = n.div_ceil(NR);
        let len = k
            .checked_mul(panels)
            .filter(|&l| {
                l.checked_mul(NR * 4)
                    .is_some_and(|b| b <= isize::MAX as usize)
            })
            .ok_or_else(|| ShapeError(format!("B of {k} x {n} is too large")))?;
        // Every row is written below (padding lanes with zeros): a repack only grows the allocation.
        self.rows.resize(len, Row::default());
        (self.k, self.n, self.kc, self.panels) = (k, n, kc, panels);
        let avx2 = has_avx2_fma();
        let mut idx = 0;
        for kb in (0..k).step_by(kc) {
            let kl = kc.min(k - kb);
            for j in 0..panels {
                let c0 = j * NR;
                let width = NR.min(n - c0);
                let dst = &mut self.rows[idx..idx + kl];
                if col_stride == 1 && width == NR {
                    for (p, row) in (kb..).zip(dst.iter_mut()) {
                        row.0.copy_from_slice(&src[p * row_stride + c0..][..NR]);
                    }
                } else if row_stride == 1 && width == NR && avx2 {
                    let base = src[c0 * col_stride + kb..].as_ptr();
                    // SAFETY: AVX2 is present; columns c0..c0 + NR and rows kb..kb + kl are inside `src`
                    // (checked against `last` above), and `dst` holds `kl` rows.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx2::transpose_panel(base, col_stride, kl, dst.as_mut_ptr() as *mut f32)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!("AVX2 on a non-x86 target: {base:?}");
                } else if row_stride == 1 {
                    // Transposing: read each column's run of `k` contiguously.
                    for jj in 0..NR {
                        if jj < width {
                            let col = &src[(c0 + jj) * col_stride + kb..][..kl];
                            for (row, &v) in dst.iter_mut().zip(col) {
                                row.0[jj] = v;
                            }
                        } else {
                            dst.iter_mut().for_each(|row| row.0[jj] = 0.0);
                        }
                    }
                } else {
                    for (p, row) in (kb..).zip(dst.iter_mut()) {
                        for (jj, v) in row.0.iter_mut().enumerate() {
                            *v = if jj < width {
                                src[p * row_stride + (c0 + jj) * col_stride]
                            } else {
                                0.0
                            };
                        }
                    }
                }
                idx += kl;
            }
        }
        Ok(())
    }

    /// Where row `p` of panel `j / NR` lives.
    #[inline]
    fn index(&self, p: usize, j: usize) -> usize {
        let bi = p / self.kc;
        let kl = self.kc.min(self.k - bi * self.kc);
        bi * self.kc * self.panels + (j / NR) * kl + p % self.kc
    }

    /// Rows of `B` (the shared dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of `B` (the output width).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held by the packed copy.
    pub fn memory_bytes(&self) -> usize {
        self.rows.len() * NR * 4 + self.plain.as_ref().map_or(0, |p| p.len() * 4)
    }

    /// `B` back as row-major `[k, n]` (tests, debugging).
    pub fn to_kn(&self) -> Vec<f32> {
        if let Some(plain) = &self.plain {
            return plain.clone();
        }
        let mut out = vec![0f32; self.k * self.n];
        for p in 0..self.k {
            for j in 0..self.n {
                out[p * self.n + j] = self.rows[self.index(p, j)].0[j % NR];
            }
        }
        out
    }
}

fn check_len(what: &str, len: usize, rows: usize, cols: usize) -> Result<(), ShapeError> {
    match rows.checked_mul(cols) {
        Some(want) if want == len => Ok(()),
        _ => Err(ShapeError(format!(
            "{what} holds {len} values, not {rows} x {cols}"
        ))),
    }
}

/// Where the product goes and what it starts from.
#[derive(Debug)]
pub struct Output<'a> {
    /// `C`, row-major `[m, n]` with row stride `ld` (`ld ≥ n`; the last row may be just `n` long).
    pub data: &'a mut [f32],
    /// Row stride of `data`.
    pub ld: usize,
    /// `C += A·B` (e.g. into a residual stream) instead of `C = A·B`.
    pub accumulate: bool,
    /// Added to every row (`n` values).
    pub bias: Option<&'a [f32]>,
}

/// A function applied to every finished stretch of an output row (at most [`NR`] values) while it is in cache,
/// with the stretch's row and first column: `map(row, col, values)`.
pub type TileMap<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// [`Output`] as a raw pointer, for outputs whose rows interleave with other outputs written at the same time
/// (the heads of an attention layer share rows).
#[derive(Debug)]
pub struct RawOutput<'a> {
    /// The first element of `C`.
    pub ptr: *mut f32,
    /// Row stride.
    pub ld: usize,
    /// `C += A·B` instead of `C = A·B`.
    pub accumulate: bool,
    /// Added to every row (`n` values).
    pub bias: Option<&'a [f32]>,
}

/// `C = [C +] A · B [+ bias]`, then `map` over the finished values, for `A` row-major `[m, k]` with row stride
/// `lda` and `B` packed.
///
/// ```
/// use dinov2_kernels::sgemm::{gemm_packed, Output, PackedB, Parallelism};
/// let b = PackedB::from_kn(&[1., 2., 3., 4.], 2, 2).unwrap(); // [[1, 2], [3, 4]]
/// let mut c = vec![100f32, 100.];
/// let relu = |_row: usize, _col: usize, t: &mut [f32]| t.iter_mut().for_each(|v| *v = v.max(0.0));
/// let out = Output { data: &mut c, ld: 2, accumulate: true, bias: None };
/// gemm_packed(&[1., -50.], 1, 2, &b, out, Some(&relu), Parallelism::None).unwrap();
/// assert_eq!(c, [100. + 1. - 150., 100. + 2. - 200.].map(|v: f32| v.max(0.)));
/// ```
pub fn gemm_packed(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedB,
    out: Output<'_>,
    map: Option<TileMap<'_>>,
    par: Parallelism,
) -> Result<(), ShapeError> {
    let Output {
        data: c,
        ld: ldc,
        accumulate,
        bias,
    } = out;
    let n = b.n;
    if ldc < n || span(m, ldc, n).is_none_or(|l| c.len() < l) {
        return Err(ShapeError(format!(
            "C holds {} values with row stride {ldc}, not {m} rows of {n}",
            c.len()
        )));
    }
    let out = RawOutput {
        ptr: c.as_mut_ptr(),
        ld: ldc,
        accumulate,
        bias,
    };
    // SAFETY: `c` is borrowed mutably and holds every element the product writes (checked above).
    unsafe { gemm_packed_raw(a, m, lda, b, out, map, par) }
}

/// `A · B [+ bias]`, then `map`, into a new row-major `[m, n]` buffer written once (no zero fill first).
///
/// ```
/// use dinov2_kernels::sgemm::{gemm_packed_new, PackedB, Parallelism};
/// let b = PackedB::from_kn(&[1., 2., 3., 4.], 2, 2).unwrap(); // [[1, 2], [3, 4]]
/// let c = gemm_packed_new(&[1., 1., 0., 2.], 2, 2, &b, Some(&[0.5, 0.]), None, Parallelism::Rayon).unwrap();
/// assert_eq!(c, [4.5, 6., 6.5, 8.]);
/// ```
pub fn gemm_packed_new(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedB,
    bias: Option<&[f32]>,
    map: Option<TileMap<'_>>,
    par: Parallelism,
) -> Result<Vec<f32>, ShapeError> {
    let len = m
        .checked_mul(b.n)
        .ok_or_else(|| ShapeError(format!("an output of {m} x {} is too large", b.n)))?;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let o = RawOutput {
        ptr: out.as_mut_ptr(),
        ld: b.n,
        accumulate: false,
        bias,
    };
    // SAFETY: the capacity holds the m × n output, which the product only writes (no accumulation).
    unsafe { gemm_packed_raw(a, m, lda, b, o, map, par)? };
    // SAFETY: the product wrote every one of the m·n values.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// Elements spanned by `rows` rows of `cols` at stride `ld` (`None` on overflow).
fn span(rows: usize, ld: usize, cols: usize) -> Option<usize> {
    if rows == 0 {
        Some(0)
    } else {
        (rows - 1).checked_mul(ld)?.checked_add(cols)
    }
}

/// [`gemm_packed`] into a raw output. Without `accumulate`, `C` is only written, never read: it may be
/// uninitialised memory (a `Vec`'s spare capacity).
///
/// # Safety
/// `out.ptr` is valid for reads and writes of the `m × n` tile with row stride `out.ld`, and nothing else
/// reads or writes that tile during the call.
pub unsafe fn gemm_packed_raw(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedB,
    out: RawOutput<'_>,
    map: Option<TileMap<'_>>,
    par: Parallelism,
) -> Result<(), ShapeError> {
    let (k, n) = (b.k, b.n);
    let RawOutput {
        ptr: c,
        ld: ldc,
        accumulate,
        bias,
    } = out;
    if lda < k || span(m, lda, k).is_none_or(|l| a.len() < l) {
        return Err(ShapeError(format!(
            "A holds {} values with row stride {lda}, not {m} rows of {k}",
            a.len()
        )));
    }
    if ldc < n {
        return Err(ShapeError(format!(
            "C has row stride {ldc} for rows of {n}"
        )));
    }
    if let Some(bias) = bias {
        if bias.len() != n {
            return Err(ShapeError(format!(
                "bias holds {} values, not {n}",
                bias.len()
            )));
        }
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for i in 0..m {
            let row = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
            if !accumulate {
                row.fill(0.0);
            }
            if let Some(bias) = bias {
                row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
            }
            if let Some(f) = map {
                map_row(f, i, row);
            }
        }
        return Ok(());
    }

    let threads = match par {
        Parallelism::None => 1,
        Parallelism::Rayon => rayon::current_num_threads().max(1),
    };
    if let Some(plain) = &b.plain {
        gemm_crate(
            a, m, lda, plain, k, n, c, ldc, accumulate, bias, map, threads,
        );
        return Ok(());
    }
    let mut m_blocks = m.div_ceil(MC);
    if m_blocks < threads {
        m_blocks = threads.min(m.div_ceil(MR));
    }
    let mc = m.div_ceil(m_blocks).next_multiple_of(MR);
    let m_blocks = m.div_ceil(mc);
    let n_chunks = if m_blocks < threads {
        threads.div_ceil(m_blocks).min(b.panels)
    } else {
        1
    };
    let panels_per_chunk = b.panels.div_ceil(n_chunks);
    let n_chunks = b.panels.div_ceil(panels_per_chunk);
    let tasks = m_blocks * n_chunks;

    let job = Job {
        a,
        lda,
        b,
        c: SyncPtr(c),
        ldc,
        accumulate,
        bias,
        map,
        kernel: select_kernel(),
    };
    let run = |t: usize| {
        let (mi, ni) = (t / n_chunks, t % n_chunks);
        let rows = mi * mc..(mi * mc + mc).min(m);
        let panels =
            ni * panels_per_chunk..(ni * panels_per_chunk + panels_per_chunk).min(b.panels);
        // SAFETY: tasks cover disjoint tiles of C, all inside the bounds checked above.
        unsafe { job.run(rows, panels) };
    };
    if tasks == 1 || threads == 1 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
    Ok(())
}

/// The [`Backend::Gemm`] product: bias written (or added) first, the `gemm` crate accumulating into it, then the
/// map over each row in stretches of `NR`.
///
/// # Safety
/// As [`gemm_packed_raw`], with every size checked by it.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_crate(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &[f32],
    k: usize,
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    bias: Option<&[f32]>,
    map: Option<TileMap<'_>>,
    threads: usize,
) {
    let cp = SyncPtr(c);
    let rows = |f: &(dyn Fn(usize, &mut [f32]) + Sync)| {
        let run = |i: usize| f(i, std::slice::from_raw_parts_mut(cp.get().add(i * ldc), n));
        if threads > 1 {
            (0..m).into_par_iter().for_each(run);
        } else {
            (0..m).for_each(run);
        }
    };
    if let Some(bias) = bias {
        rows(&|_, row| {
            if accumulate {
                row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
            } else {
                row.copy_from_slice(bias);
            }
        });
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate || bias.is_some(),
        a.as_ptr(),
        1,
        lda as isize,
        b.as_ptr(),
        1,
        n as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    );
    if let Some(f) = map {
        rows(&|i, row| map_row(f, i, row));
    }
}

/// `map` over a whole output row `i` in stretches of `NR`, as the micro-kernel path calls it tile by tile.
fn map_row(map: TileMap<'_>, i: usize, row: &mut [f32]) {
    for (jc, t) in row.chunks_mut(NR).enumerate() {
        map(i, jc * NR, t);
    }
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    #[inline(always)]
    fn get(self) -> *mut f32 {
        self.0
    }
}
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// The operands of one `MR × NR` micro-tile: `c = [c +] a · b [+ bias]`.
struct Tile {
    /// Length of the shared dimension in this block.
    kl: usize,
    /// The first of the tile's rows of `A` (row-major, stride `lda`), at the block's first column.
    a: *const f32,
    lda: usize,
    /// Valid rows of `A` (1..=MR): rows past it repeat the last valid one, and their results are not wanted.
    mr: usize,
    /// The `kl × NR` panel of `B`, 64-byte aligned.
    b: *const f32,
    /// The tile of `C`, `MR × NR` with row stride `ldc`.
    c: *mut f32,
    ldc: usize,
    load_c: bool,
    /// Null, or `NR` values added to every row.
    bias: *const f32,
}

impl Tile {
    /// The tile's row pointers into `A`.
    #[inline(always)]
    fn rows(&self) -> [*const f32; MR] {
        std::array::from_fn(|i| self.a.wrapping_add(i.min(self.mr - 1) * self.lda))
    }
}

type Kernel = unsafe fn(&Tile);

struct Job<'a> {
    a: &'a [f32],
    lda: usize,
    b: &'a PackedB,
    c: SyncPtr,
    ldc: usize,
    accumulate: bool,
    bias: Option<&'a [f32]>,
    map: Option<TileMap<'a>>,
    kernel: Kernel,
}

impl Job<'_> {
    /// The tile `rows × panels` of C. `A` is read in place (no packing): its block of rows and columns
    /// (at most `MC × KC`) stays in L2 while the micro-kernel walks it once per panel of `B`.
    ///
    /// # Safety
    /// No other thread touches this tile; `rows` and `panels` are within the checked bounds.
    unsafe fn run(&self, rows: std::ops::Range<usize>, panels: std::ops::Range<usize>) {
        let b = self.b;
        let (k, n) = (b.k, b.n);
        let blocks = k.div_ceil(b.kc);
        for bi in 0..blocks {
            let kb = bi * b.kc;
            let kl = b.kc.min(k - kb);
            let first = bi == 0;
            let last = bi + 1 == blocks;
            let load_c = self.accumulate || !first;
            for j in panels.clone() {
                let bp = b.rows.as_ptr().add(bi * b.kc * b.panels + j * kl) as *const f32;
                let col = j * NR;
                let nr = NR.min(n - col);
                let bias = match (first, self.bias) {
                    (true, Some(bias)) => bias.as_ptr().add(col),
                    _ => std::ptr::null(),
                };
                for row in rows.clone().step_by(MR) {
                    let mr = MR.min(rows.end - row);
                    let cp = self.c.0.add(row * self.ldc + col);
                    let mut tile = Tile {
                        kl,
                        a: self.a.as_ptr().add(row * self.lda + kb),
                        lda: self.lda,
                        mr,
                        b: bp,
                        c: cp,
                        ldc: self.ldc,
                        load_c,
                        bias,
                    };
                    if mr == MR && nr == NR {
                        (self.kernel)(&tile);
                    } else {
                        let mut tmp = [Row::default(); MR];
                        (tile.c, tile.ldc, tile.load_c, tile.bias) =
                            (tmp.as_mut_ptr() as *mut f32, NR, false, std::ptr::null());
                        (self.kernel)(&tile);
                        for (i, t) in tmp.iter().enumerate().take(mr) {
                            store_row(&t.0[..nr], cp.add(i * self.ldc), bias, load_c);
                        }
                    }
                    if last {
                        if let Some(f) = self.map {
                            for i in 0..mr {
                                let values =
                                    std::slice::from_raw_parts_mut(cp.add(i * self.ldc), nr);
                                f(row + i, col, values);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn select_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if !force_portable() && has_avx2_fma() {
            return avx2::kernel;
        }
    }
    kernel_portable
}

/// Whether this CPU runs the AVX2+FMA micro-kernel.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
thread_local! {
    static FORCE_PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
thread_local! {
    static FORCE_BACKEND: std::cell::Cell<Option<Backend>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
fn force_portable() -> bool {
    FORCE_PORTABLE.with(|f| f.get())
}

#[cfg(not(test))]
#[inline]
fn force_portable() -> bool {
    false
}

/// The micro-kernel in plain Rust, for CPUs without AVX2+FMA. Same summation order as the SIMD kernel
/// (`k` in order, one multiply-add per step), so the two agree up to FMA rounding.
unsafe fn kernel_portable(t: &Tile) {
    let rows = t.rows();
    let mut acc = [[0f32; NR]; MR];
    for p in 0..t.kl {
        let bp = std::slice::from_raw_parts(t.b.add(p * NR), NR);
        for (acc, row) in acc.iter_mut().zip(rows) {
            let x = *row.add(p);
            for (o, &y) in acc.iter_mut().zip(bp) {
                *o += x * y;
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        store_row(acc, t.c.add(i * t.ldc), t.bias, t.load_c);
    }
}

/// `dst[j] = acc[j] [+ bias[j]] [+ dst[j]]`: a micro-tile row's store, in plain Rust (the portable kernel, and
/// the edge tiles, which the SIMD kernel computes into a scratch tile).
///
/// # Safety
/// `dst` is valid for `acc.len()` values; `bias` is null or holds as many.
#[inline(always)]
unsafe fn store_row(acc: &[f32], dst: *mut f32, bias: *const f32, load_c: bool) {
    for (jj, &v) in acc.iter().enumerate() {
        let mut v = v;
        if !bias.is_null() {
            v += *bias.add(jj);
        }
        if load_c {
            v += *dst.add(jj);
        }
        *dst.add(jj) = v;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Tile, MR, NR};
    use std::arch::x86_64::*;

    /// `dst[p · NR + jj] = src[jj · col_stride + p]` for the `NR` columns `jj` and `p < kl`: one panel of a
    /// transposed operand (the keys of an attention head), 8 × 8 blocks at a time.
    ///
    /// # Safety
    /// The CPU has AVX2; `src` is valid for `NR` runs of `kl` values `col_stride` apart, `dst` for `kl · NR`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose_panel(
        src: *const f32,
        col_stride: usize,
        kl: usize,
        dst: *mut f32,
    ) {
        for half in 0..NR / 8 {
            let cols = src.add(half * 8 * col_stride);
            let out = dst.add(half * 8);
            let mut p = 0;
            while p + 8 <= kl {
                let r: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_loadu_ps(cols.add(i * col_stride + p)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let o = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (q, v) in o.into_iter().enumerate() {
                    _mm256_storeu_ps(out.add((p + q) * NR), v);
                }
                p += 8;
            }
            for p in p..kl {
                for i in 0..8 {
                    *out.add(p * NR + i) = *cols.add(i * col_stride + p);
                }
            }
        }
    }

    /// The 6 × 16 AVX2+FMA micro-kernel: 12 accumulators, two loads of `B` and six broadcasts of `A` per step.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the tile's rows of `A` hold `kl` values each, `b` holds `kl · NR` values
    /// (64-byte aligned), `c` is valid for an `MR × NR` tile with row stride `ldc`, and `bias` is null or holds
    /// `NR` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel(t: &Tile) {
        const _: () = assert!(MR == 6 && NR == 16);
        let (c, ldc) = (t.c, t.ldc);
        // The C tile is read (or written) only after the loop: ask for its lines now, so they arrive
        // during the FMAs instead of stalling the stores (C is often far larger than L2).
        for i in 0..MR {
            let row = c.add(i * ldc) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.add(NR * 4 - 4));
        }
        let [a0, a1, a2, a3, a4, a5] = t.rows();
        let mut acc = [_mm256_setzero_ps(); 12];
        let mut b = t.b;
        let mut p = 0;
        macro_rules! step {
            () => {{
                let b0 = _mm256_load_ps(b);
                let b1 = _mm256_load_ps(b.add(8));
                let x = _mm256_broadcast_ss(&*a0.add(p));
                acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
                let x = _mm256_broadcast_ss(&*a1.add(p));
                acc[2] = _mm256_fmadd_ps(x, b0, acc[2]);
                acc[3] = _mm256_fmadd_ps(x, b1, acc[3]);
                let x = _mm256_broadcast_ss(&*a2.add(p));
                acc[4] = _mm256_fmadd_ps(x, b0, acc[4]);
                acc[5] = _mm256_fmadd_ps(x, b1, acc[5]);
                let x = _mm256_broadcast_ss(&*a3.add(p));
                acc[6] = _mm256_fmadd_ps(x, b0, acc[6]);
                acc[7] = _mm256_fmadd_ps(x, b1, acc[7]);
                let x = _mm256_broadcast_ss(&*a4.add(p));
                acc[8] = _mm256_fmadd_ps(x, b0, acc[8]);
                acc[9] = _mm256_fmadd_ps(x, b1, acc[9]);
                let x = _mm256_broadcast_ss(&*a5.add(p));
                acc[10] = _mm256_fmadd_ps(x, b0, acc[10]);
                acc[11] = _mm256_fmadd_ps(x, b1, acc[11]);
                b = b.add(NR);
                p += 1;
            }};
        }
        let kl = t.kl;
        while p + 4 <= kl {
            step!();
            step!();
            step!();
            step!();
        }
        while p < kl {
            step!();
        }
        let bias = t.bias;
        let (b0, b1) = if bias.is_null() {
            (_mm256_setzero_ps(), _mm256_setzero_ps())
        } else {
            (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)))
        };
        for i in 0..MR {
            let dst = c.add(i * ldc);
            let mut v0 = acc[2 * i];
            let mut v1 = acc[2 * i + 1];
            if !bias.is_null() {
                v0 = _mm256_add_ps(v0, b0);
                v1 = _mm256_add_ps(v1, b1);
            }
            if t.load_c {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(dst));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(dst.add(8)));
            }
            _mm256_storeu_ps(dst, v0);
            _mm256_storeu_ps(dst.add(8), v1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn mark(row: usize, col: usize) -> f32 {
        ((row * 7 + col) % 5) as f32 * 0.5
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        m: usize,
        k: usize,
        n: usize,
        lda: usize,
        ldc: usize,
        acc: bool,
        bias: bool,
        par: Parallelism,
    ) {
        let a = values(m.saturating_sub(1) * lda + k, 1 + m as u64);
        let w = values(n * k, 2 + n as u64);
        let bv = values(n, 3);
        let c0 = values(m.saturating_sub(1) * ldc + n + 5, 4);
        let packed = PackedB::from_weight(&w, n, k).unwrap();
        let mut c = c0.clone();
        let map = |i: usize, j: usize, t: &mut [f32]| {
            // Depends on the position, so a wrong (row, col) shows.
            t.iter_mut()
                .enumerate()
                .for_each(|(jj, v)| *v = 2.0 * *v + 1.0 + mark(i, j + jj))
        };
        gemm_packed(
            &a,
            m,
            lda,
            &packed,
            Output {
                data: &mut c,
                ld: ldc,
                accumulate: acc,
                bias: bias.then_some(&bv[..]),
            },
            Some(&map),
            par,
        )
        .unwrap();
        for i in 0..m {
            for j in 0..ldc.min(c.len() - i * ldc) {
                let got = c[i * ldc + j];
                if j >= n {
                    assert_eq!(got, c0[i * ldc + j], "outside the output at ({i}, {j})");
                    continue;
                }
                let mut want = 0f64;
                let mut mag = 0f64;
                for p in 0..k {
                    let t = a[i * lda + p] as f64 * w[j * k + p] as f64;
                    want += t;
                    mag += t.abs();
                }
                if bias {
                    want += bv[j] as f64;
                    mag += (bv[j] as f64).abs();
                }
                if acc {
                    want += c0[i * ldc + j] as f64;
                    mag += (c0[i * ldc + j] as f64).abs();
                }
                let want = 2.0 * want + 1.0 + mark(i, j) as f64;
                // Summation error of k + 2 terms in f32, doubled by the map.
                let tol = 2.0 * (k as f64 + 3.0) * f32::EPSILON as f64 * mag + 1e-6;
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "m {m} k {k} n {n} at ({i}, {j}): {got} vs {want} (tol {tol:e})"
                );
            }
        }
    }

    fn sweep() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (6, 16, 16),
            (7, 5, 17),
            (13, 300, 33),
            (5, 256, 16),
            (12, 257, 48),
            (150, 40, 20),
            (290, 520, 35),
            (3, 0, 4),
        ] {
            for (acc, bias) in [(false, false), (true, false), (false, true), (true, true)] {
                for par in [Parallelism::None, Parallelism::Rayon] {
                    check(m, k, n, k, n, acc, bias, par);
                }
            }
            check(m, k, n, k + 3, n + 7, true, true, Parallelism::Rayon);
        }
    }

    #[test]
    fn matches_f64_reference() {
        FORCE_BACKEND.with(|f| f.set(Some(Backend::Panels)));
        sweep();
    }

    #[test]
    fn portable_kernel_matches_f64_reference() {
        FORCE_BACKEND.with(|f| f.set(Some(Backend::Panels)));
        FORCE_PORTABLE.with(|f| f.set(true));
        // The kernel is chosen on the calling thread, so the rayon runs take the portable one too.
        sweep();
        FORCE_PORTABLE.with(|f| f.set(false));
    }

    #[test]
    fn gemm_backend_matches_f64_reference() {
        // The layout AVX-512 CPUs get, exercised here whatever the CPU (the gemm crate picks its own kernels).
        FORCE_BACKEND.with(|f| f.set(Some(Backend::Gemm)));
        let b = PackedB::from_kn(&[1., 2., 3., 4.], 2, 2).unwrap();
        assert!(b.plain.is_some() && b.rows.is_empty());
        sweep();
        FORCE_BACKEND.with(|f| f.set(None));
    }

    #[test]
    fn results_do_not_depend_on_threads() {
        FORCE_BACKEND.with(|f| f.set(Some(Backend::Panels)));
        let (m, k, n) = (301, 700, 70);
        let a = values(m * k, 7);
        let w = values(n * k, 8);
        let packed = PackedB::from_weight(&w, n, k).unwrap();
        let run = |par| {
            let mut c = vec![0f32; m * n];
            let out = Output {
                data: &mut c,
                ld: n,
                accumulate: false,
                bias: None,
            };
            gemm_packed(&a, m, k, &packed, out, None, par).unwrap();
            c
        };
        let one = run(Parallelism::None);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        assert_eq!(one, pool.install(|| run(Parallelism::Rayon)));
    }

    #[test]
    fn packing_round_trips_and_sizes_are_checked() {
        let (k, n) = (530, 37);
        let kn = values(k * n, 9);
        let b = PackedB::from_kn(&kn, k, n).unwrap();
        assert_eq!(b.to_kn(), kn);
        let mut nk = vec![0f32; n * k];
        for p in 0..k {
            for j in 0..n {
                nk[j * k + p] = kn[p * n + j];
            }
        }
        let mut reused = PackedB::from_weight(&nk, n, k).unwrap();
        assert_eq!(reused.to_kn(), kn);
        // Repacking into a used buffer: a smaller matrix, then a general strided one (every other column).
        reused.repack_strided(&kn, 3, 5, n, 1).unwrap();
        assert_eq!(
            reused.to_kn(),
            [&kn[..5], &kn[n..n + 5], &kn[2 * n..2 * n + 5]].concat()
        );
        reused.repack_strided(&kn, 4, 18, n, 2).unwrap();
        let every_other: Vec<f32> = (0..4)
            .flat_map(|p| (0..18).map(move |j| (p, j)))
            .map(|(p, j)| kn[p * n + 2 * j])
            .collect();
        assert_eq!(reused.to_kn(), every_other);
        assert!(reused.repack_strided(&kn, k, n, n, 2).is_err());
        assert!(PackedB::from_weight(&nk, n, k + 1).is_err());
        assert!(PackedB::from_kn(&kn, usize::MAX, 2).is_err());
        let mut c = vec![0f32; 3 * n];
        fn out(c: &mut [f32], n: usize) -> Output<'_> {
            Output {
                data: c,
                ld: n,
                accumulate: false,
                bias: None,
            }
        }
        let err = gemm_packed(
            &kn[..2 * k],
            3,
            k,
            &b,
            out(&mut c, n),
            None,
            Parallelism::None,
        );
        assert!(err.unwrap_err().0.contains("A holds"));
        let a = vec![0f32; 4 * k];
        let err = gemm_packed(&a, 4, k, &b, out(&mut c, n), None, Parallelism::None);
        assert!(err.unwrap_err().0.contains("C holds"));
        let short_bias = Output {
            data: &mut c,
            ld: n,
            accumulate: false,
            bias: Some(&[1.0]),
        };
        let err = gemm_packed(&a, 3, k, &b, short_bias, None, Parallelism::None);
        assert!(err.unwrap_err().0.contains("bias"));
    }
}
