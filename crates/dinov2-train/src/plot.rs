//! A PNG of the training loss curves, drawn from the metrics JSON lines: [`plot_losses`].
//!
//! No font files and no system fonts: the text is drawn with a built-in 5×7 bitmap font (digits, ASCII letters
//! and `._-+:()/,=%`), so the plot looks the same on every machine.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};

/// One curve: a name for the legend and its `(x, y)` points. Points with a NaN or infinite coordinate are
/// skipped when drawing.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend entry, e.g. `total_loss`.
    pub name: String,
    /// `(iteration, value)` pairs, in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// The colours of the series, in order (cycled past the tenth series): the `tab10` palette of matplotlib.
pub const SERIES_COLOURS: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// The colour [`render`] draws series number `index` with.
///
/// ```
/// use dinov2_train::plot::{series_colour, SERIES_COLOURS};
/// assert_eq!(series_colour(0).0, SERIES_COLOURS[0]);
/// assert_eq!(series_colour(10), series_colour(0)); // cycled
/// ```
pub fn series_colour(index: usize) -> Rgb<u8> {
    Rgb(SERIES_COLOURS[index % SERIES_COLOURS.len()])
}

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const TEXT: Rgb<u8> = Rgb([20, 20, 20]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const LEGEND_BORDER: Rgb<u8> = Rgb([170, 170, 170]);

/// Size of the PNG [`plot_losses`] writes, in pixels.
pub const PLOT_SIZE: (u32, u32) = (960, 540);

/// Reads the loss curves of a metrics JSON-lines file (`training_metrics.jsonl`): one [`Series`] per key ending in
/// `_loss`, points `(iteration, value)`.
///
/// Lines that are not a JSON object with a numeric `iteration` are skipped (a run killed mid-write leaves a
/// truncated last line), and so are values that are not finite numbers (`NaN` is written as `null`). Points
/// are sorted by iteration; when an iteration appears twice (a run resumed from a checkpoint older than its
/// last log line) the later line wins. `total_loss` comes first, the other series in name order.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("training_metrics.jsonl");
/// std::fs::write(&path, concat!(
///     "{\"iteration\": 0, \"total_loss\": 9.5, \"koleo_loss\": -0.1, \"lr\": 0.0}\n",
///     "{\"iteration\": 10, \"total_loss\": 9.1, \"koleo_loss\": null, \"lr\": 1e-4}\n",
///     "{\"iteration\": 20, \"total_lo", // truncated
/// ))?;
/// let series = dinov2_train::plot::read_loss_series(&path)?;
/// assert_eq!(series[0].name, "total_loss");
/// assert_eq!(series[0].points, [(0.0, 9.5), (10.0, 9.1)]);
/// assert_eq!(series[1].name, "koleo_loss");
/// assert_eq!(series[1].points, [(0.0, -0.1)]);
/// assert_eq!(series.len(), 2); // `lr` is not a loss
/// # Ok(()) }
/// ```
pub fn read_loss_series(metrics_jsonl: impl AsRef<Path>) -> Result<Vec<Series>> {
    let path = metrics_jsonl.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut series: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for line in text.lines() {
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(line.trim()) else {
            continue;
        };
        let Some(it) = obj
            .get("iteration")
            .and_then(|v| v.as_f64())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        for (key, value) in &obj {
            if !key.ends_with("_loss") {
                continue;
            }
            if let Some(v) = value.as_f64().filter(|v| v.is_finite()) {
                series.entry(key.clone()).or_default().push((it, v));
            }
        }
    }
    let mut out: Vec<Series> = series
        .into_iter()
        .map(|(name, mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0)); // stable: equal iterations keep file order
            let mut dedup: Vec<(f64, f64)> = Vec::with_capacity(points.len());
            for p in points {
                match dedup.last_mut() {
                    Some(last) if last.0 == p.0 => *last = p,
                    _ => dedup.push(p),
                }
            }
            Series {
                name,
                points: dedup,
            }
        })
        .collect();
    out.sort_by_key(|s| s.name != "total_loss"); // stable: the rest stay in name order
    Ok(out)
}

/// Draws the loss curves of `metrics_jsonl` (see [`read_loss_series`]) into a [`PLOT_SIZE`] PNG at `png`,
/// atomically (a temporary file in the same directory, then a rename): every key ending in `_loss` against
/// `iteration`, one colour per series, a legend, tick labels on both axes and a title.
///
/// An empty file (or one with no loss yet) gives a plot saying "no data", not an error; a file that cannot be
/// read is [`Error::Io`].
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let metrics = dir.path().join("training_metrics.jsonl");
/// let lines: String = (0..50)
///     .map(|i| format!("{{\"iteration\": {}, \"total_loss\": {}, \"ibot_loss\": {}}}\n",
///         i * 10, 11.0 - (i as f64).sqrt(), 5.0 - 0.05 * i as f64))
///     .collect();
/// std::fs::write(&metrics, lines)?;
/// let png = dir.path().join("training_losses.png");
/// dinov2_train::plot::plot_losses(&metrics, &png)?;
/// let img = image::open(&png)?.to_rgb8();
/// assert_eq!(img.dimensions(), dinov2_train::plot::PLOT_SIZE);
/// assert!(img.pixels().any(|p| *p == dinov2_train::plot::series_colour(1))); // the second curve is drawn
/// # Ok(()) }
/// ```
pub fn plot_losses(metrics_jsonl: impl AsRef<Path>, png: impl AsRef<Path>) -> Result<()> {
    let series = read_loss_series(metrics_jsonl)?;
    let img = render(&series, "training losses", PLOT_SIZE.0, PLOT_SIZE.1);
    write_png(&img, png.as_ref())
}

/// Encodes `img` as PNG and writes it to `path` atomically.
fn write_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, synced, then renamed over
/// `path`. On error the temporary file is removed and `path` is untouched.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = path.file_name() else {
        return Err(Error::InvalidArgument {
            name: "path",
            reason: format!("{} is not a file path", path.display()),
        });
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Draws `series` as a line chart of `width`×`height` pixels: a title, a frame with grid lines and tick labels
/// (x: iteration, y: value), one colour per series ([`series_colour`]), and a legend naming them.
///
/// Never fails: NaN and infinite points are skipped, a single point is drawn as a marker, a constant series
/// gets a small range around its value, and no finite point at all gives a frame saying "no data". Text that does
/// not fit is clipped.
///
/// ```
/// use dinov2_train::plot::{render, series_colour, Series};
/// let s = Series { name: "total_loss".into(), points: vec![(0.0, 3.0), (100.0, 1.0), (200.0, f64::NAN)] };
/// let img = render(&[s], "losses", 320, 200);
/// assert_eq!(img.dimensions(), (320, 200));
/// assert!(img.pixels().filter(|p| **p == series_colour(0)).count() > 50);
/// ```
pub fn render(series: &[Series], title: &str, width: u32, height: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, BACKGROUND);
    let lay = Layout::new(series, width, height);
    let s = lay.scale;
    let mut canvas = Canvas { img: &mut img };
    // Title, centred.
    let tw = text_width(title, s);
    canvas.text((width as i64 - tw) / 2, lay.pad, title, s, TEXT);
    let (x0, y0, x1, y1) = lay.plot;
    if x1 - x0 >= 2 && y1 - y0 >= 2 {
        // Grid and tick labels.
        let tick = 3 * s;
        for (v, label) in &lay.yticks {
            let y = lay.py(*v);
            canvas.hline(x0, x1, y, GRID);
            canvas.hline(x0 - tick, x0, y, AXIS);
            let w = text_width(label, s);
            canvas.text(x0 - tick - lay.pad - w, y - 7 * s / 2, label, s, TEXT);
        }
        for (v, label) in &lay.xticks {
            let x = lay.px(*v);
            canvas.vline(x, y0, y1, GRID);
            canvas.vline(x, y1, y1 + tick, AXIS);
            let w = text_width(label, s);
            canvas.text(x - w / 2, y1 + tick + lay.pad, label, s, TEXT);
        }
        // Axis names.
        let xl = "iteration";
        canvas.text(
            (x0 + x1 - text_width(xl, s)) / 2,
            y1 + tick + 2 * lay.pad + 7 * s,
            xl,
            s,
            TEXT,
        );
        canvas.text(
            x0 - text_width("value", s) / 2,
            y0 - lay.pad - 7 * s,
            "value",
            s,
            TEXT,
        );
        // The curves, clipped to the frame.
        let clip = (x0, y0, x1, y1);
        for (i, se) in series.iter().enumerate() {
            let colour = series_colour(i);
            let pts: Vec<(i64, i64)> = se
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| (lay.px(x), lay.py(y)))
                .collect();
            match pts.as_slice() {
                [] => {}
                [(x, y)] => canvas.square(*x, *y, 2 * s + 1, colour, clip),
                _ => {
                    for w in pts.windows(2) {
                        canvas.line(w[0], w[1], s, colour, clip);
                    }
                }
            }
        }
        if !lay.has_data {
            let msg = "no data";
            canvas.text(
                (x0 + x1 - text_width(msg, s)) / 2,
                (y0 + y1 - 7 * s) / 2,
                msg,
                s,
                TEXT,
            );
        }
        // The frame on top of the curves.
        canvas.hline(x0, x1, y0, AXIS);
        canvas.hline(x0, x1, y1, AXIS);
        canvas.vline(x0, y0, y1, AXIS);
        canvas.vline(x1, y0, y1, AXIS);
    }
    // The legend: a framed box with one swatch and name per series.
    if let Some((lx0, ly0, lx1, ly1)) = lay.legend {
        canvas.fill(lx0, ly0, lx1, ly1, BACKGROUND);
        canvas.hline(lx0, lx1, ly0, LEGEND_BORDER);
        canvas.hline(lx0, lx1, ly1, LEGEND_BORDER);
        canvas.vline(lx0, ly0, ly1, LEGEND_BORDER);
        canvas.vline(lx1, ly0, ly1, LEGEND_BORDER);
        let whole = (0, 0, width as i64 - 1, height as i64 - 1);
        for (i, se) in series.iter().enumerate() {
            let row = ly0 + lay.pad + i as i64 * lay.legend_row;
            let mid = row + 7 * s / 2;
            let sx = lx0 + lay.pad;
            canvas.line(
                (sx, mid),
                (sx + lay.swatch, mid),
                s + 1,
                series_colour(i),
                whole,
            );
            canvas.text(sx + lay.swatch + lay.pad, row, &se.name, s, TEXT);
        }
    }
    img
}

/// Where everything goes, in pixels (`i64` so that tiny images never underflow).
struct Layout {
    /// Text scale: glyphs are `5s`×`7s`.
    scale: i64,
    pad: i64,
    /// The frame: left, top, right, bottom.
    plot: (i64, i64, i64, i64),
    /// The data range of the frame: x low/high, y low/high.
    range: (f64, f64, f64, f64),
    xticks: Vec<(f64, String)>,
    yticks: Vec<(f64, String)>,
    /// The legend box, when there are series.
    legend: Option<(i64, i64, i64, i64)>,
    legend_row: i64,
    swatch: i64,
    has_data: bool,
}

impl Layout {
    fn new(series: &[Series], width: u32, height: u32) -> Self {
        let (w, h) = (width as i64, height as i64);
        let s: i64 = if w >= 480 && h >= 320 { 2 } else { 1 };
        let pad = 3 * s;
        let ch = 7 * s;
        let finite = || {
            series
                .iter()
                .flat_map(|se| se.points.iter())
                .filter(|(x, y)| x.is_finite() && y.is_finite())
        };
        let has_data = finite().next().is_some();
        let bounds = |f: fn(&(f64, f64)) -> f64| {
            finite()
                .map(f)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                })
        };
        let (xlo, xhi) = if has_data {
            bounds(|p| p.0)
        } else {
            (0.0, 1.0)
        };
        let (ylo, yhi) = if has_data {
            bounds(|p| p.1)
        } else {
            (0.0, 1.0)
        };
        let integer_x = finite().all(|(x, _)| x.fract() == 0.0);
        let (xlo, xhi) = widen(xlo, xhi, 0.0, if integer_x { 1.0 } else { 0.0 });
        let (ylo, yhi) = widen(ylo, yhi, 0.05, 0.0);

        let yticks = ticks(ylo, yhi, (h / (ch * 5)).clamp(2, 8), 0.0);
        let ylabel_w = yticks
            .iter()
            .map(|(_, l)| text_width(l, s))
            .max()
            .unwrap_or(0);
        let tick = 3 * s;
        let left = pad + ylabel_w.max(text_width("value", s) / 2) + pad + tick;
        let top = pad + ch + pad + ch + pad; // title, then the y axis name
        let bottom = tick + pad + ch + pad + ch + pad;

        // The legend goes to the right of the frame when it takes at most 40% of the width, else inside the
        // frame's top-right corner.
        let swatch = 12 * s;
        let legend_row = ch + pad;
        let name_w = series
            .iter()
            .map(|se| text_width(&se.name, s))
            .max()
            .unwrap_or(0);
        let legend_w = pad + swatch + pad + name_w + pad;
        let legend_h = pad + series.len() as i64 * legend_row;
        let outside = legend_w + 2 * pad <= w * 2 / 5;
        let right = if outside { legend_w + 2 * pad } else { 3 * pad };
        let plot = (left, top, w - 1 - right, h - 1 - bottom);
        let legend = (!series.is_empty()).then(|| {
            let lx1 = if outside { w - 1 - pad } else { plot.2 - pad };
            let ly0 = if outside { top } else { top + pad };
            (lx1 - legend_w, ly0, lx1, ly0 + legend_h)
        });
        // As many x ticks as their labels leave room for.
        let xlabel_w = [xlo, xhi]
            .iter()
            .map(|v| text_width(&format!("{v:.0}"), s) + 3 * text_width("0", s))
            .max()
            .unwrap_or(1)
            .max(1);
        let xticks = ticks(
            xlo,
            xhi,
            ((plot.2 - plot.0) / xlabel_w).clamp(2, 10),
            if integer_x { 1.0 } else { 0.0 },
        );
        Layout {
            scale: s,
            pad,
            plot,
            range: (xlo, xhi, ylo, yhi),
            xticks,
            yticks,
            legend,
            legend_row,
            swatch,
            has_data,
        }
    }

    fn px(&self, x: f64) -> i64 {
        let (x0, _, x1, _) = self.plot;
        let (lo, hi, _, _) = self.range;
        x0 + ((x - lo) / (hi - lo) * (x1 - x0) as f64).round() as i64
    }

    fn py(&self, y: f64) -> i64 {
        let (_, y0, _, y1) = self.plot;
        let (_, _, lo, hi) = self.range;
        y1 - ((y - lo) / (hi - lo) * (y1 - y0) as f64).round() as i64
    }
}

/// A drawable range around `[lo, hi]`: `margin` of the span added on each side; a single value widened to a
/// small range around it (by `min_half`, else 10% of the value, else 1).
fn widen(lo: f64, hi: f64, margin: f64, min_half: f64) -> (f64, f64) {
    let span = hi - lo;
    if span > 0.0 && span.is_finite() {
        return (lo - margin * span, hi + margin * span);
    }
    if !span.is_finite() {
        return (lo, hi); // values near ±f64::MAX: no room for a margin
    }
    let half = if min_half > 0.0 {
        min_half
    } else if lo != 0.0 {
        lo.abs() * 0.1
    } else {
        1.0
    };
    (lo - half, hi + half)
}

/// Round tick values in `[lo, hi]`, about `target` of them (1, 2 or 5 × a power of ten apart, at least
/// `min_step`), with their labels.
fn ticks(lo: f64, hi: f64, target: i64, min_step: f64) -> Vec<(f64, String)> {
    let span = hi - lo;
    if !(span > 0.0 && span.is_finite()) {
        return vec![(lo, label(lo, 1.0, lo.abs()))];
    }
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|st| *st >= raw)
        .unwrap_or(10.0 * mag)
        .max(min_step);
    let first = (lo / step).ceil();
    let last = (hi / step).floor();
    let n = ((last - first) as i64 + 1).clamp(0, 50);
    let max_abs = lo.abs().max(hi.abs());
    (0..n)
        .map(|k| {
            let v = (first + k as f64) * step;
            (v, label(v, step, max_abs))
        })
        .collect()
}

/// A tick label for `v` on an axis with ticks `step` apart and values up to `max_abs`: plain decimals with as
/// many digits as the step needs, scientific notation (`1.5e-5`, `2e6`) for very large or small values.
fn label(v: f64, step: f64, max_abs: f64) -> String {
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    let step_exp = step.log10().floor();
    if max_abs >= 1e6 || (max_abs > 0.0 && max_abs < 1e-3) {
        let digits = (max_abs.log10().floor() - step_exp).clamp(0.0, 4.0) as usize;
        format!("{v:.digits$e}")
    } else {
        let decimals = (-step_exp).clamp(0.0, 6.0) as usize;
        format!("{v:.decimals$}")
    }
}

/// Width in pixels of `text` drawn at scale `s` (glyphs 5 wide, 1 apart).
fn text_width(text: &str, s: i64) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (6 * n - 1) * s
    }
}

/// Clipped drawing on an image.
struct Canvas<'a> {
    img: &'a mut RgbImage,
}

impl Canvas<'_> {
    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
        let (w, h) = (self.img.width() as i64, self.img.height() as i64);
        for y in y0.max(0)..=y1.min(h - 1) {
            for x in x0.max(0)..=x1.min(w - 1) {
                self.img.put_pixel(x as u32, y as u32, c);
            }
        }
    }

    fn hline(&mut self, x0: i64, x1: i64, y: i64, c: Rgb<u8>) {
        self.fill(x0, y, x1, y, c);
    }

    fn vline(&mut self, x: i64, y0: i64, y1: i64, c: Rgb<u8>) {
        self.fill(x, y0, x, y1, c);
    }

    /// A filled `size`×`size` square centred on `(x, y)`, inside `clip`.
    fn square(&mut self, x: i64, y: i64, size: i64, c: Rgb<u8>, clip: (i64, i64, i64, i64)) {
        let a = size / 2;
        let (cx0, cy0, cx1, cy1) = clip;
        self.fill(
            (x - a).max(cx0),
            (y - a).max(cy0),
            (x - a + size - 1).min(cx1),
            (y - a + size - 1).min(cy1),
            c,
        );
    }

    /// A line `thick` pixels wide (Bresenham with a square pen), inside `clip`.
    fn line(
        &mut self,
        (xa, ya): (i64, i64),
        (xb, yb): (i64, i64),
        thick: i64,
        c: Rgb<u8>,
        clip: (i64, i64, i64, i64),
    ) {
        let (dx, dy) = ((xb - xa).abs(), -(yb - ya).abs());
        let (sx, sy) = (if xa < xb { 1 } else { -1 }, if ya < yb { 1 } else { -1 });
        let (mut x, mut y, mut err) = (xa, ya, dx + dy);
        loop {
            self.square(x, y, thick, c, clip);
            if x == xb && y == yb {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// `text` with its top-left corner at `(x, y)`, glyphs scaled by `s`.
    fn text(&mut self, x: i64, y: i64, text: &str, s: i64, c: Rgb<u8>) {
        for (i, ch) in text.chars().enumerate() {
            let gx = x + 6 * s * i as i64;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (px, py) = (gx + col * s, y + row as i64 * s);
                        self.fill(px, py, px + s - 1, py + s - 1, c);
                    }
                }
            }
        }
    }
}

/// The 5×7 bitmap of `c`: seven rows, bit 4 the leftmost column. Unknown characters draw as `?`.
fn glyph(c: char) -> [u8; 7] {
    match c {
        ' ' => [0; 7],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0x00, 0x00, 0x0F, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x0E, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decay(name: &str, n: usize, from: f64, to: f64) -> Series {
        Series {
            name: name.into(),
            points: (0..n)
                .map(|i| {
                    let t = i as f64 / (n - 1).max(1) as f64;
                    ((10 * i) as f64, from + (to - from) * t.sqrt())
                })
                .collect(),
        }
    }

    fn count(img: &RgbImage, c: Rgb<u8>, (x0, y0, x1, y1): (i64, i64, i64, i64)) -> usize {
        img.enumerate_pixels()
            .filter(|(x, y, p)| {
                let (x, y) = (*x as i64, *y as i64);
                **p == c && x >= x0 && x <= x1 && y >= y0 && y <= y1
            })
            .count()
    }

    const EVERYWHERE: (i64, i64, i64, i64) = (0, 0, i64::MAX, i64::MAX);

    #[test]
    fn every_series_is_drawn_in_its_colour_inside_the_frame() {
        let series = [
            decay("total_loss", 40, 11.0, 6.0),
            decay("dino_local_crops_loss", 40, 5.0, 3.0),
            decay("koleo_loss", 40, -0.02, -0.3),
        ];
        let img = render(&series, "training losses", 640, 400);
        let lay = Layout::new(&series, 640, 400);
        let (x0, y0, x1, y1) = lay.plot;
        for i in 0..series.len() {
            let inside = count(&img, series_colour(i), lay.plot);
            assert!(inside > (x1 - x0) as usize, "series {i}: {inside} pixels");
            // A curve spans the frame: it has pixels near both the left and the right edges.
            let w = (x1 - x0) / 20;
            assert!(count(&img, series_colour(i), (x0, y0, x0 + w, y1)) > 0);
            assert!(count(&img, series_colour(i), (x1 - w, y0, x1, y1)) > 0);
        }
        // The first point of the highest curve sits at the top of the data range, the lowest at the bottom.
        let top_left = lay.py(11.0);
        assert!(top_left >= y0 && top_left < y0 + (y1 - y0) / 10);
        let near = |y: i64| (x0, y - 2, x0 + 4, y + 2);
        assert!(count(&img, series_colour(0), near(top_left)) > 0);
        assert!(count(&img, series_colour(2), near(lay.py(-0.02))) > 0);
        let bottom = lay.py(-0.3);
        assert!(bottom <= y1 && bottom > y1 - (y1 - y0) / 10);
        // No other colour than the palette's and the chart's own.
        let known: Vec<Rgb<u8>> = SERIES_COLOURS
            .iter()
            .map(|c| Rgb(*c))
            .chain([BACKGROUND, TEXT, AXIS, GRID, LEGEND_BORDER])
            .collect();
        assert!(img.pixels().all(|p| known.contains(p)));
    }

    #[test]
    fn the_legend_names_each_series_with_its_colour() {
        let series = [
            decay("total_loss", 10, 3.0, 1.0),
            decay("ibot_loss", 10, 2.0, 1.5),
        ];
        let img = render(&series, "t", 800, 450);
        let lay = Layout::new(&series, 800, 450);
        let (lx0, ly0, lx1, ly1) = lay.legend.unwrap();
        assert!(
            lx0 > lay.plot.2,
            "wide enough: the legend is right of the frame"
        );
        assert_eq!(ly1 - ly0, lay.pad + 2 * lay.legend_row);
        for i in 0..2 {
            let row = ly0 + lay.pad + i * lay.legend_row;
            let band = (lx0, row, lx1, row + lay.legend_row - 1);
            assert!(
                count(&img, series_colour(i as usize), band) > 0,
                "swatch {i}"
            );
            // The name: text pixels right of the swatch, as many as its glyphs have set bits.
            let name = &series[i as usize].name;
            let bits: usize = name
                .chars()
                .flat_map(glyph)
                .map(|b| b.count_ones() as usize)
                .sum();
            let s = lay.scale as usize;
            let text_band = (
                lx0 + lay.pad + lay.swatch + 1,
                row,
                lx1,
                row + 7 * lay.scale,
            );
            assert_eq!(count(&img, TEXT, text_band), bits * s * s, "{name}");
        }
        // The title is drawn above the frame.
        assert!(
            count(
                &img,
                TEXT,
                (0, 0, 799, lay.plot.1 - 7 * lay.scale - 2 * lay.pad)
            ) > 0
        );
    }

    #[test]
    fn a_narrow_image_puts_the_legend_inside_the_frame() {
        let series = [decay("a_very_long_series_name_loss", 5, 1.0, 0.0)];
        let lay = Layout::new(&series, 200, 150);
        let (_, ly0, lx1, _) = lay.legend.unwrap();
        assert_eq!((lx1, ly0), (lay.plot.2 - lay.pad, lay.plot.1 + lay.pad));
        let img = render(&series, "t", 200, 150);
        assert!(count(&img, series_colour(0), EVERYWHERE) > 0);
    }

    #[test]
    fn degenerate_inputs_never_panic() {
        let nan = Series {
            name: "nan_loss".into(),
            points: vec![
                (0.0, f64::NAN),
                (f64::INFINITY, 1.0),
                (5.0, f64::NEG_INFINITY),
            ],
        };
        let one = Series {
            name: "one_loss".into(),
            points: vec![(7.0, 2.5)],
        };
        let constant = Series {
            name: "flat_loss".into(),
            points: vec![(0.0, 0.0), (10.0, 0.0)],
        };
        let huge = Series {
            name: "huge".into(),
            points: vec![(0.0, -f64::MAX), (1.0, f64::MAX)],
        };
        let tiny = Series {
            name: "tiny".into(),
            points: vec![(0.0, 1e-7), (1e9, 3e-7)],
        };
        let empty = Series {
            name: "empty".into(),
            points: vec![],
        };
        for (w, h) in [(0, 0), (1, 1), (10, 5), (64, 48), (320, 200), (960, 540)] {
            for set in [
                vec![],
                vec![nan.clone()],
                vec![one.clone()],
                vec![constant.clone()],
                vec![huge.clone()],
                vec![tiny.clone()],
                vec![empty.clone(), nan.clone(), one.clone()],
            ] {
                let img = render(&set, "degenerate", w, h);
                assert_eq!(img.dimensions(), (w, h));
            }
        }
        // A single point is a visible marker; a constant series a visible line.
        let img = render(&[one], "t", 320, 200);
        assert!(count(&img, series_colour(0), EVERYWHERE) >= 9);
        let img = render(&[nan.clone(), constant], "t", 320, 200);
        assert!(count(&img, series_colour(1), EVERYWHERE) > 100);
        // Nothing finite: "no data" in the frame.
        let lay = Layout::new(std::slice::from_ref(&nan), 320, 200);
        assert!(!lay.has_data);
        let img = render(&[nan], "t", 320, 200);
        let (x0, y0, x1, y1) = lay.plot;
        assert!(count(&img, TEXT, (x0 + 1, y0 + 1, x1 - 1, y1 - 1)) > 0);
    }

    #[test]
    fn tick_labels_are_round_and_in_range() {
        let t = ticks(0.0, 1000.0, 5, 1.0);
        let labels: Vec<&str> = t.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["0", "200", "400", "600", "800", "1000"]);
        let t = ticks(-0.31, 0.02, 4, 0.0);
        assert!(t.iter().all(|(v, _)| (-0.31..=0.02).contains(v)));
        assert!(t.iter().any(|(_, l)| l == "0.0"), "{t:?}");
        assert!(t.iter().all(|(_, l)| l != "-0.0"));
        // One iteration: integer steps, not 0.5.
        let (lo, hi) = widen(10.0, 10.0, 0.0, 1.0);
        let t = ticks(lo, hi, 6, 1.0);
        assert_eq!(
            t.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>(),
            ["9", "10", "11"]
        );
        // Scientific notation for very small and very large values.
        let t = ticks(1e-5, 5e-5, 4, 0.0);
        assert!(t.iter().all(|(_, l)| l.contains('e')), "{t:?}");
        assert_eq!(label(2e6, 1e6, 2e6), "2e6");
        // Every label is drawable with the built-in font.
        let unknown = glyph('\u{2603}');
        for (_, l) in ticks(-1e-4, 3e7, 8, 0.0) {
            assert!(l.chars().all(|c| glyph(c) != unknown), "{l}");
        }
    }

    #[test]
    fn the_font_has_every_glyph_the_plot_uses() {
        let unknown = glyph('\u{2603}');
        for c in ('0'..='9')
            .chain('a'..='z')
            .chain('A'..='Z')
            .chain("._-+:()/,=%".chars())
        {
            assert_ne!(glyph(c), unknown, "{c}");
            assert!(glyph(c).iter().all(|r| *r < 0x20), "{c} is 5 columns wide");
        }
        // Distinct glyphs for distinct characters (a typo in a bitmap shows up as a duplicate).
        let all: Vec<char> = ('0'..='9').chain('a'..='z').chain('A'..='Z').collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(glyph(*a), glyph(*b), "{a} and {b}");
            }
        }
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("training_metrics.jsonl");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_reader_skips_bad_lines_and_values_and_keeps_the_last_of_a_repeated_iteration() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            concat!(
                "{\"iteration\": 0, \"total_loss\": 9.0, \"ibot_loss\": 3.0, \"lr\": 0.1}\n",
                "\n",
                "not json\n",
                "[1, 2]\n",
                "{\"total_loss\": 1.0}\n",
                "{\"iteration\": \"ten\", \"total_loss\": 1.0}\n",
                "{\"iteration\": 20, \"total_loss\": null, \"ibot_loss\": \"NaN\"}\n",
                "{\"iteration\": 10, \"total_loss\": 8.0}\n",
                "{\"iteration\": 20, \"total_loss\": 7.0, \"koleo_loss\": -0.2}\n",
                "{\"iteration\": 10, \"total_loss\": 7.5}\n",
                "{\"iteration\": 30, \"total_loss\": 6.",
            ),
        );
        let s = read_loss_series(&p).unwrap();
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["total_loss", "ibot_loss", "koleo_loss"]);
        assert_eq!(s[0].points, [(0.0, 9.0), (10.0, 7.5), (20.0, 7.0)]);
        assert_eq!(s[1].points, [(0.0, 3.0)]);
        assert_eq!(s[2].points, [(20.0, -0.2)]);
        // Invalid UTF-8 on one line does not lose the others.
        let mut bytes = b"{\"iteration\": 1, \"x_loss\": 2.0}\n\xff\xfe\n".to_vec();
        bytes.extend_from_slice(b"{\"iteration\": 2, \"x_loss\": 1.0}\n");
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(
            read_loss_series(&p).unwrap()[0].points,
            [(1.0, 2.0), (2.0, 1.0)]
        );
    }

    #[test]
    fn plot_losses_writes_a_png_atomically_even_for_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("training_losses.png");
        let metrics = write(dir.path(), "");
        plot_losses(&metrics, &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), PLOT_SIZE);
        assert!(
            img.pixels().all(|p| !SERIES_COLOURS.contains(&p.0)),
            "nothing to draw"
        );
        // Overwritten in place with the curves; no temporary file left behind.
        write(
            dir.path(),
            "{\"iteration\": 0, \"total_loss\": 2.0}\n{\"iteration\": 5, \"total_loss\": 1.0}\n",
        );
        plot_losses(&metrics, &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        assert!(img.pixels().any(|p| *p == series_colour(0)));
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["training_losses.png", "training_metrics.jsonl"]);
    }

    #[test]
    fn unreadable_inputs_and_unwritable_outputs_are_io_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.jsonl");
        let png = dir.path().join("out.png");
        match plot_losses(&missing, &png) {
            Err(Error::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert!(!png.exists());
        let metrics = write(dir.path(), "{\"iteration\": 0, \"total_loss\": 1.0}\n");
        let bad = dir.path().join("no_such_dir").join("out.png");
        assert!(matches!(plot_losses(&metrics, &bad), Err(Error::Io { .. })));
        // A directory is not a metrics file.
        assert!(matches!(
            plot_losses(dir.path(), &png),
            Err(Error::Io { .. })
        ));
    }
}
