//! Datasets: image folders (with or without class subfolders), file lists (txt/CSV), the ImageNet-1k layout and
//! tar shards (WebDataset style).
//!
//! A dataset only lists samples; decoding happens in [`Dataset::get`], called by the loader's workers, so a bad file
//! costs one failed `get` (reported and skipped by the loader), never the dataset.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use crate::decode::{decode_rgb, load_rgb_with, DecodeOptions};
use crate::error::{Error, Result};

/// Extensions recognised as images when listing folders, case-insensitive: torchvision's `IMG_EXTENSIONS`, then
/// every other extension of a format this crate's `image` build decodes (GIF, JFIF, APNG and the other PNM names).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp", "gif", "jfif", "apng", "pbm",
    "pam", "pnm",
];

/// One decoded sample (what [`Dataset::get`] returns).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The RGB image.
    pub image: RgbImage,
    /// Class index, when the dataset has labels.
    pub label: Option<i64>,
}

/// A random-access collection of images.
///
/// ```
/// use dinov2_data::{Dataset, DecodeOptions, Result, Sample};
/// /// Solid-colour images, one per label: a dataset that needs no files.
/// struct Colours(Vec<[u8; 3]>);
/// impl Dataset for Colours {
///     fn len(&self) -> usize { self.0.len() }
///     fn get(&self, index: usize, _: &DecodeOptions) -> Result<Sample> {
///         let c = *self.0.get(index).ok_or(dinov2_data::Error::IndexOutOfRange { index, len: self.len() })?;
///         Ok(Sample { image: image::RgbImage::from_pixel(8, 8, image::Rgb(c)), label: Some(index as i64) })
///     }
///     fn describe(&self, index: usize) -> String { format!("colour #{index}") }
///     fn label(&self, index: usize) -> Option<i64> { (index < self.len()).then_some(index as i64) }
/// }
/// let ds = Colours(vec![[255, 0, 0], [0, 0, 255]]);
/// let s = ds.get(1, &DecodeOptions::default())?;
/// assert_eq!((s.image.get_pixel(0, 0).0, s.label), ([0, 0, 255], Some(1)));
/// assert!(ds.get(2, &DecodeOptions::default()).is_err());
/// # Ok::<(), dinov2_data::Error>(())
/// ```
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loads and decodes sample `index`.
    fn get(&self, index: usize, opts: &DecodeOptions) -> Result<Sample>;
    /// A human-readable name of sample `index` (its path), for warnings.
    fn describe(&self, index: usize) -> String;
    /// Label of sample `index` without decoding it.
    fn label(&self, index: usize) -> Option<i64>;
}

/// True when the path has an image extension ([`IMAGE_EXTENSIONS`], case-insensitive).
///
/// ```
/// use dinov2_data::dataset::has_image_extension;
/// assert!(has_image_extension("a/b.JPEG") && has_image_extension("x.webp"));
/// assert!(!has_image_extension("notes.txt") && !has_image_extension("jpg"));
/// ```
pub fn has_image_extension(p: impl AsRef<Path>) -> bool {
    p.as_ref()
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn list_images_recursive(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut entries: Vec<PathBuf> = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        entries.push(e.path());
    }
    entries.sort();
    for p in entries {
        // follow symlinks like os.walk(followlinks=True) would for files; directories are recursed
        if p.is_dir() {
            list_images_recursive(&p, out)?;
        } else if has_image_extension(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// A dataset of image files on disk with optional labels.
///
/// ```
/// use dinov2_data::{Dataset, DecodeOptions, FileDataset};
/// let root = tempfile::tempdir()?;
/// for (class, colour) in [("cat", [200, 0, 0]), ("dog", [0, 0, 200])] {
///     std::fs::create_dir(root.path().join(class))?;
///     image::RgbImage::from_pixel(4, 4, image::Rgb(colour)).save(root.path().join(class).join("0.png"))?;
/// }
/// let ds = FileDataset::image_folder(root.path())?;
/// assert_eq!((ds.len(), ds.classes.clone()), (2, vec!["cat".to_string(), "dog".to_string()]));
/// let s = ds.get(1, &DecodeOptions::default())?;
/// assert_eq!((s.label, s.image.get_pixel(0, 0).0), (Some(1), [0, 0, 200]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct FileDataset {
    /// (path, label) per sample.
    pub entries: Vec<(PathBuf, Option<i64>)>,
    /// Class names (folder names or ImageNet names), index = label.
    pub classes: Vec<String>,
}

impl FileDataset {
    /// torchvision `ImageFolder`: every subfolder of `root` is a class (sorted by name; label = rank), its images
    /// (recursively, sorted) are the samples (example: [`FileDataset`]).
    ///
    /// Errors: [`Error::Io`] on an unreadable folder, [`Error::NoClassFolders`], [`Error::NoImages`].
    pub fn image_folder(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let rd = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
        let mut classes: Vec<String> = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io(root, e))?;
            if e.path().is_dir() {
                classes.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(Error::NoClassFolders {
                root: root.to_path_buf(),
            });
        }
        let mut entries = Vec::new();
        for (i, c) in classes.iter().enumerate() {
            let mut files = Vec::new();
            list_images_recursive(&root.join(c), &mut files)?;
            entries.extend(files.into_iter().map(|p| (p, Some(i as i64))));
        }
        if entries.is_empty() {
            return Err(Error::NoImages {
                root: root.to_path_buf(),
            });
        }
        Ok(Self { entries, classes })
    }

    /// Every image under `root`, recursively (sorted paths), without labels.
    ///
    /// ```
    /// use dinov2_data::{Dataset, FileDataset};
    /// let root = tempfile::tempdir()?;
    /// std::fs::create_dir(root.path().join("sub"))?;
    /// image::RgbImage::new(3, 3).save(root.path().join("sub/a.png"))?;
    /// image::RgbImage::new(3, 3).save(root.path().join("b.bmp"))?;
    /// std::fs::write(root.path().join("notes.txt"), "not an image")?;
    /// let ds = FileDataset::unlabeled_folder(root.path())?;
    /// assert_eq!(ds.len(), 2);
    /// assert_eq!(ds.label(0), None);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn unlabeled_folder(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let mut files = Vec::new();
        list_images_recursive(root, &mut files)?;
        if files.is_empty() {
            return Err(Error::NoImages {
                root: root.to_path_buf(),
            });
        }
        Ok(Self {
            entries: files.into_iter().map(|p| (p, None)).collect(),
            classes: Vec::new(),
        })
    }

    /// A file list: `.csv` files have comma-separated `path[,label]` rows (a first row whose label is not an
    /// integer is a header); other files have one `path` or `path<whitespace>label` per line. Empty lines and
    /// lines starting with `#` are ignored. Relative paths are resolved against the list's folder (see
    /// [`FileDataset::file_list_with_root`] for another base).
    ///
    /// Errors: [`Error::Io`], [`Error::BadLabel`] (with the line), [`Error::EmptyFileList`].
    ///
    /// ```
    /// use dinov2_data::{Dataset, Error, FileDataset};
    /// let dir = tempfile::tempdir()?;
    /// let list = dir.path().join("train.csv");
    /// std::fs::write(&list, "path,label\nimg/a.jpg,3\nimg/b.jpg,\n")?;
    /// let ds = FileDataset::file_list(&list)?;
    /// assert_eq!((ds.len(), ds.label(0), ds.label(1)), (2, Some(3), None));
    /// assert_eq!(ds.entries[0].0, dir.path().join("img/a.jpg"));
    /// std::fs::write(&list, "a.jpg,1\nb.jpg,cat\n")?;
    /// assert!(matches!(FileDataset::file_list(&list), Err(Error::BadLabel { line: 2, .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn file_list(list: impl AsRef<Path>) -> Result<Self> {
        let list = list.as_ref();
        Self::file_list_with_root(list, list.parent().unwrap_or(Path::new(".")))
    }

    /// [`FileDataset::file_list`] with relative paths resolved against `root`.
    ///
    /// ```
    /// use dinov2_data::FileDataset;
    /// let dir = tempfile::tempdir()?;
    /// let list = dir.path().join("val.txt");
    /// std::fs::write(&list, "# path label\nn01/x.JPEG 0\n/abs/y.JPEG 1\n")?;
    /// let ds = FileDataset::file_list_with_root(&list, "/data/imagenet/val")?;
    /// assert_eq!(ds.entries[0].0, std::path::Path::new("/data/imagenet/val/n01/x.JPEG"));
    /// assert_eq!(ds.entries[1].0, std::path::Path::new("/abs/y.JPEG"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn file_list_with_root(list: impl AsRef<Path>, root: impl AsRef<Path>) -> Result<Self> {
        let (list, base) = (list.as_ref(), root.as_ref());
        let text = std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?;
        let csv = list
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let mut entries = Vec::new();
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, label) = if csv {
                let mut it = line.splitn(3, ',').map(|f| f.trim().trim_matches('"'));
                (it.next().unwrap_or(""), it.next())
            } else {
                match line.rsplit_once(char::is_whitespace) {
                    Some((p, l)) if l.parse::<i64>().is_ok() => (p.trim(), Some(l)),
                    _ => (line, None),
                }
            };
            let label = match label {
                None | Some("") => None,
                Some(l) => match l.parse::<i64>() {
                    Ok(v) => Some(v),
                    Err(_) if entries.is_empty() && csv => continue, // header row
                    Err(_) => {
                        return Err(Error::BadLabel {
                            path: list.to_path_buf(),
                            line: lineno + 1,
                            label: l.to_string(),
                        })
                    }
                },
            };
            if path.is_empty() {
                continue;
            }
            let p = Path::new(path);
            entries.push((
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    base.join(p)
                },
                label,
            ));
        }
        if entries.is_empty() {
            return Err(Error::EmptyFileList {
                path: list.to_path_buf(),
            });
        }
        Ok(Self {
            entries,
            classes: Vec::new(),
        })
    }

    /// ImageNet-1k layout: `root/{train,val}/{wnid}/*.JPEG`, labels from the sorted wnids (as the official code and
    /// `ImageFolder`); class names from `root/labels.txt` (`wnid,name` lines) when present.
    ///
    /// ```
    /// use dinov2_data::{Dataset, FileDataset, ImageNetSplit};
    /// let root = tempfile::tempdir()?;
    /// for wnid in ["n01440764", "n01443537"] {
    ///     let d = root.path().join("val").join(wnid);
    ///     std::fs::create_dir_all(&d)?;
    ///     image::RgbImage::new(2, 2).save(d.join("ILSVRC2012_val_1.JPEG"))?;
    /// }
    /// std::fs::write(root.path().join("labels.txt"), "n01440764,tench\nn01443537,goldfish\n")?;
    /// let ds = FileDataset::imagenet(root.path(), ImageNetSplit::Val)?;
    /// assert_eq!((ds.len(), ds.label(1)), (2, Some(1)));
    /// assert_eq!(ds.classes[1], "n01443537,goldfish");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn imagenet(root: impl AsRef<Path>, split: ImageNetSplit) -> Result<Self> {
        let root = root.as_ref();
        let dir = root.join(match split {
            ImageNetSplit::Train => "train",
            ImageNetSplit::Val => "val",
        });
        let mut ds = Self::image_folder(&dir)?;
        if let Ok(text) = std::fs::read_to_string(root.join("labels.txt")) {
            let names: HashMap<&str, &str> =
                text.lines().filter_map(|l| l.split_once(',')).collect();
            for c in &mut ds.classes {
                if let Some(n) = names.get(c.as_str()) {
                    *c = format!("{c},{n}");
                }
            }
        }
        Ok(ds)
    }
}

/// ImageNet split (see [`FileDataset::imagenet`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageNetSplit {
    /// `train/`
    Train,
    /// `val/` (class subfolders, as the official layout)
    Val,
}

impl Dataset for FileDataset {
    fn len(&self) -> usize {
        self.entries.len()
    }
    fn get(&self, index: usize, opts: &DecodeOptions) -> Result<Sample> {
        let (p, label) = self.entries.get(index).ok_or(Error::IndexOutOfRange {
            index,
            len: self.entries.len(),
        })?;
        Ok(Sample {
            image: load_rgb_with(p, opts)?,
            label: *label,
        })
    }
    fn describe(&self, index: usize) -> String {
        self.entries
            .get(index)
            .map_or_else(|| format!("#{index}"), |(p, _)| p.display().to_string())
    }
    fn label(&self, index: usize) -> Option<i64> {
        self.entries.get(index).and_then(|e| e.1)
    }
}

/// One image member of a tar shard (see [`TarDataset`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// Index of the shard in [`TarDataset::shards`].
    pub shard: usize,
    /// Member name.
    pub name: String,
    /// Byte offset of the member data in the shard.
    pub offset: u64,
    /// Member size in bytes.
    pub size: u64,
    /// Label from a sibling `<key>.cls` member (WebDataset convention), if any.
    pub label: Option<i64>,
}

/// Images stored in uncompressed tar shards (WebDataset style: members sharing a key `dir/name` before the first
/// `.` form a sample; `key.jpg`/`.png`/... is the image, `key.cls` an optional integer label).
///
/// Shards are indexed once by a sequential scan of their headers (ustar, GNU long names and pax `path`/`size`
/// records are understood); samples are then read by offset. Sample order is shard order, then member order, so a
/// non-shuffled sampler reads every shard sequentially.
///
/// ```
/// use dinov2_data::{Dataset, DecodeOptions, TarDataset};
/// # fn member(tar: &mut Vec<u8>, name: &str, data: &[u8]) {
/// #     let mut h = [0u8; 512];
/// #     h[..name.len()].copy_from_slice(name.as_bytes());
/// #     h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
/// #     h[156] = b'0';
/// #     h[148..156].copy_from_slice(b"        ");
/// #     let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
/// #     h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
/// #     tar.extend_from_slice(&h);
/// #     tar.extend_from_slice(data);
/// #     tar.resize(tar.len().div_ceil(512) * 512, 0);
/// # }
/// let dir = tempfile::tempdir()?;
/// let mut png = std::io::Cursor::new(Vec::new());
/// image::RgbImage::from_pixel(6, 5, image::Rgb([9, 8, 7])).write_to(&mut png, image::ImageFormat::Png)?;
/// let mut tar = Vec::new(); // a WebDataset shard: 000.png with its label in 000.cls
/// member(&mut tar, "shard/000.png", png.get_ref());
/// member(&mut tar, "shard/000.cls", b"42");
/// tar.extend_from_slice(&[0; 1024]);
/// std::fs::write(dir.path().join("train-0000.tar"), &tar)?;
///
/// let ds = TarDataset::open_dir(dir.path())?;
/// assert_eq!(ds.len(), 1);
/// let s = ds.get(0, &DecodeOptions::default())?;
/// assert_eq!((s.image.dimensions(), s.label), ((6, 5), Some(42)));
/// assert!(ds.describe(0).ends_with("train-0000.tar:shard/000.png"));
/// assert_eq!(ds.read_bytes(0)?, png.into_inner());
/// assert_eq!(TarDataset::open([dir.path().join("train-0000.tar")])?, ds);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TarDataset {
    /// Shard paths.
    pub shards: Vec<PathBuf>,
    /// Image members.
    pub entries: Vec<TarEntry>,
    /// Problems met while indexing (truncated or corrupt shards: the readable part is kept).
    pub warnings: Vec<String>,
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // base-256 (GNU) for big sizes
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let s = s.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn parse_pax(data: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().position(|&b| b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp + 1 || len > rest.len() {
            break;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(eq) = rec.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&rec[..eq]).into_owned(),
                String::from_utf8_lossy(&rec[eq + 1..]).into_owned(),
            );
        }
        rest = &rest[len..];
    }
    out
}

/// A regular member of a tar archive: (name, data offset, size).
pub type TarMember = (String, u64, u64);

/// Lists the regular members of a tar file by a sequential header scan. Returns the members read before any
/// problem, and the problem (truncation, bad checksum) if one was met. [`TarDataset`] has an example of a tar file.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("empty.tar");
/// std::fs::write(&path, [0u8; 1024])?; // just the end-of-archive blocks
/// assert_eq!(dinov2_data::dataset::scan_tar(&path)?, (vec![], None));
/// std::fs::write(&path, [1u8; 700])?;
/// let (members, problem) = dinov2_data::dataset::scan_tar(&path)?;
/// assert!(members.is_empty() && problem.unwrap().contains("checksum"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn scan_tar(path: impl AsRef<Path>) -> Result<(Vec<TarMember>, Option<String>)> {
    let path = path.as_ref();
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut members = Vec::new();
    let mut pos = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax: HashMap<String, String> = HashMap::new();
    let mut hdr = [0u8; 512];
    loop {
        if pos + 512 > file_len {
            let problem = if pos == file_len {
                None
            } else {
                Some(format!("truncated header at byte {pos}"))
            };
            return Ok((members, problem));
        }
        f.seek(SeekFrom::Start(pos))
            .map_err(|e| Error::io(path, e))?;
        f.read_exact(&mut hdr).map_err(|e| Error::io(path, e))?;
        if hdr.iter().all(|&b| b == 0) {
            return Ok((members, None));
        }
        let stored = parse_octal(&hdr[148..156]);
        let sum: u64 = hdr
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if stored != Some(sum) {
            return Ok((members, Some(format!("bad header checksum at byte {pos}"))));
        }
        let Some(mut size) = parse_octal(&hdr[124..136]) else {
            return Ok((members, Some(format!("bad size field at byte {pos}"))));
        };
        if let Some(s) = pax.get("size").and_then(|s| s.parse::<u64>().ok()) {
            size = s;
        }
        let data = pos + 512;
        if size > file_len - data {
            return Ok((members, Some(format!("member at byte {pos} truncated"))));
        }
        let typeflag = hdr[156];
        let mut name = cstr(&hdr[0..100]);
        if &hdr[257..262] == b"ustar" {
            let prefix = cstr(&hdr[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let read_data = |f: &mut File| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; size as usize];
            f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
            Ok(buf)
        };
        match typeflag {
            b'L' => long_name = Some(cstr(&read_data(&mut f)?)),
            b'x' => pax = parse_pax(&read_data(&mut f)?),
            b'0' | 0 | b'7' => {
                let n = pax
                    .remove("path")
                    .or_else(|| long_name.take())
                    .unwrap_or(name);
                members.push((n, data, size));
                pax.clear();
                long_name = None;
            }
            _ => {
                pax.clear();
                long_name = None;
            }
        }
        pos = data + size.div_ceil(512) * 512;
    }
}

impl TarDataset {
    /// Indexes the given shards (in the given order; example: [`TarDataset`]).
    ///
    /// Errors: [`Error::Io`] on an unreadable shard, [`Error::NoTarImages`] when no shard has an image member.
    pub fn open<P: AsRef<Path>>(shards: impl IntoIterator<Item = P>) -> Result<Self> {
        let shards: Vec<PathBuf> = shards
            .into_iter()
            .map(|p| p.as_ref().to_path_buf())
            .collect();
        let mut entries = Vec::new();
        let mut warnings = Vec::new();
        for (si, shard) in shards.iter().enumerate() {
            let (members, problem) = scan_tar(shard)?;
            if let Some(p) = problem {
                warnings.push(format!(
                    "{}: {p}; keeping the {} members before it",
                    shard.display(),
                    members.len()
                ));
            }
            let key = |n: &str| {
                let (dir, file) = n.rsplit_once('/').map_or(("", n), |(d, f)| (d, f));
                let stem = file.split_once('.').map_or(file, |(s, _)| s);
                format!("{dir}/{stem}")
            };
            let mut labels: HashMap<String, i64> = HashMap::new();
            let mut f = File::open(shard).map_err(|e| Error::io(shard, e))?;
            for (n, off, size) in &members {
                if n.ends_with(".cls") && *size < 64 {
                    let mut buf = vec![0u8; *size as usize];
                    f.seek(SeekFrom::Start(*off))
                        .map_err(|e| Error::io(shard, e))?;
                    f.read_exact(&mut buf).map_err(|e| Error::io(shard, e))?;
                    if let Ok(v) = String::from_utf8_lossy(&buf).trim().parse::<i64>() {
                        labels.insert(key(n), v);
                    }
                }
            }
            for (n, off, size) in members {
                if has_image_extension(Path::new(&n)) {
                    let label = labels.get(&key(&n)).copied();
                    entries.push(TarEntry {
                        shard: si,
                        name: n,
                        offset: off,
                        size,
                        label,
                    });
                }
            }
        }
        if entries.is_empty() {
            return Err(Error::NoTarImages { shards });
        }
        Ok(Self {
            shards,
            entries,
            warnings,
        })
    }

    /// Indexes every `*.tar` file of a folder (sorted; example: [`TarDataset`]).
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "tar"))
            .collect();
        shards.sort();
        Self::open(shards)
    }

    /// Reads the raw bytes of sample `index` (example: [`TarDataset`]).
    pub fn read_bytes(&self, index: usize) -> Result<Vec<u8>> {
        let e = self.entries.get(index).ok_or(Error::IndexOutOfRange {
            index,
            len: self.entries.len(),
        })?;
        let shard = &self.shards[e.shard];
        let mut f = File::open(shard).map_err(|er| Error::io(shard, er))?;
        f.seek(SeekFrom::Start(e.offset))
            .map_err(|er| Error::io(shard, er))?;
        let mut buf = vec![0u8; e.size as usize];
        f.read_exact(&mut buf).map_err(|er| Error::io(shard, er))?;
        Ok(buf)
    }
}

impl Dataset for TarDataset {
    fn len(&self) -> usize {
        self.entries.len()
    }
    fn get(&self, index: usize, opts: &DecodeOptions) -> Result<Sample> {
        let bytes = self.read_bytes(index)?;
        let image = decode_rgb(&bytes, opts).map_err(|e| e.with_path(self.describe(index)))?;
        Ok(Sample {
            image,
            label: self.entries[index].label,
        })
    }
    fn describe(&self, index: usize) -> String {
        self.entries.get(index).map_or_else(
            || format!("#{index}"),
            |e| format!("{}:{}", self.shards[e.shard].display(), e.name),
        )
    }
    fn label(&self, index: usize) -> Option<i64> {
        self.entries.get(index).and_then(|e| e.label)
    }
}

/// The forms [`open_dataset`] accepts, for messages.
pub const DATASET_FORMS: &str =
    "an image folder, ImageNet:split=TRAIN|VAL:root=DIR, ImageFolder:root=DIR, \
     FileList:path=FILE[:root=DIR], Tar:root=DIR";

/// The datasets of the `Name:key=value:...` form: (name, required keys, optional keys).
const DATASET_KINDS: &[(&str, &[&str], &[&str])] = &[
    ("ImageNet", &["split", "root"], &["extra"]),
    ("ImageFolder", &["root"], &[]),
    ("FileList", &["path"], &["root"]),
    ("Tar", &["root"], &[]),
];

/// Opens the dataset a training configuration names (`train.dataset_path`):
///
/// * an existing folder: every image below it, recursively, unlabelled ([`FileDataset::unlabeled_folder`]; any
///   extension of [`IMAGE_EXTENSIONS`]);
/// * the official dataset-string form `Name:key=value:...` for the datasets of this crate:
///   * `ImageNet:split=TRAIN|VAL:root=DIR` ([`FileDataset::imagenet`]; the official `extra=DIR` is accepted and
///     not needed: the folders are listed);
///   * `ImageFolder:root=DIR`: labelled by class subfolder ([`FileDataset::image_folder`]);
///   * `FileList:path=FILE[:root=DIR]`: a txt/CSV list, relative paths against `root` or the list's folder
///     ([`FileDataset::file_list`]);
///   * `Tar:root=DIR`: the `*.tar` shards of a folder, or one `.tar` file ([`TarDataset`]).
///
/// Errors: [`Error::DatasetNotFound`] (a path that does not exist), [`Error::UnknownDataset`] (a name not listed
/// above), [`Error::DatasetSpec`] (an unknown, missing or repeated key, a bad split, a file given as a folder), and
/// those of the datasets ([`Error::NoImages`], ...).
///
/// ```
/// use dinov2_data::{open_dataset, Error};
/// let root = tempfile::tempdir()?;
/// std::fs::create_dir_all(root.path().join("cats/a"))?;
/// image::RgbImage::new(4, 4).save(root.path().join("cats/a/0.png"))?;
/// image::RgbImage::new(4, 4).save(root.path().join("1.jpg"))?;
/// let folder = open_dataset(root.path().to_str().unwrap())?; // recursive, unlabelled
/// assert_eq!((folder.len(), folder.label(0)), (2, None));
/// let classes = open_dataset(&format!("ImageFolder:root={}", root.path().display()))?;
/// assert_eq!((classes.len(), classes.label(0)), (1, Some(0))); // only the images inside class folders
/// assert!(matches!(open_dataset("ImageNet22k"), Err(Error::UnknownDataset { .. })));
/// assert!(matches!(open_dataset("ImageFolder:root=/no/such/dir"), Err(Error::DatasetNotFound { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open_dataset(spec: &str) -> Result<Arc<dyn Dataset>> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Arc::new(FileDataset::unlabeled_folder(path)?));
    }
    if path.is_file() {
        return Err(spec_error(
            spec,
            "",
            "is a file, not a folder: write FileList:path=FILE for a list, Tar:root=FILE for a tar shard",
        ));
    }
    let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let is_name = name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !is_name {
        return Err(Error::DatasetNotFound {
            path: path.to_path_buf(),
        });
    }
    let Some(&(_, required, optional)) = DATASET_KINDS.iter().find(|(n, _, _)| *n == name) else {
        return Err(Error::UnknownDataset {
            spec: spec.to_string(),
            name: name.to_string(),
        });
    };
    let mut keys: HashMap<&str, &str> = HashMap::new();
    for part in rest.split(':').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(spec_error(spec, part, format!("`{part}` is not key=value")));
        };
        if !required.contains(&k) && !optional.contains(&k) {
            let valid: Vec<&str> = required.iter().chain(optional).copied().collect();
            return Err(spec_error(
                spec,
                k,
                format!("{name} has no key `{k}`; valid keys: {}", valid.join(", ")),
            ));
        }
        if keys.insert(k, v).is_some() {
            return Err(spec_error(spec, k, format!("key `{k}` is given twice")));
        }
    }
    if let Some(missing) = required.iter().find(|k| !keys.contains_key(*k)) {
        return Err(spec_error(
            spec,
            missing,
            format!("{name} needs `{missing}=...` (the forms: {DATASET_FORMS})"),
        ));
    }
    let existing = |key: &str| -> Result<&Path> {
        let p = Path::new(keys[key]);
        if p.exists() {
            Ok(p)
        } else {
            Err(Error::DatasetNotFound {
                path: p.to_path_buf(),
            })
        }
    };
    Ok(match name {
        "ImageNet" => {
            let split = match keys["split"].to_ascii_uppercase().as_str() {
                "TRAIN" => ImageNetSplit::Train,
                "VAL" => ImageNetSplit::Val,
                other => {
                    return Err(spec_error(
                        spec,
                        "split",
                        format!("split `{other}` is not TRAIN or VAL (TEST has no class folders)"),
                    ))
                }
            };
            Arc::new(FileDataset::imagenet(existing("root")?, split)?)
        }
        "ImageFolder" => Arc::new(FileDataset::image_folder(existing("root")?)?),
        "FileList" => {
            let list = existing("path")?;
            Arc::new(match keys.contains_key("root") {
                true => FileDataset::file_list_with_root(list, existing("root")?)?,
                false => FileDataset::file_list(list)?,
            })
        }
        _ => {
            let root = existing("root")?;
            Arc::new(match root.is_dir() {
                true => TarDataset::open_dir(root)?,
                false => TarDataset::open([root])?,
            })
        }
    })
}

fn spec_error(spec: &str, key: &str, reason: impl Into<String>) -> Error {
    Error::DatasetSpec {
        spec: spec.to_string(),
        key: key.to_string(),
        reason: reason.into(),
    }
}
