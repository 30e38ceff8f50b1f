//! Datasets (folders, lists, ImageNet layout, tar shards), samplers and the loader: determinism across thread
//! counts, bad-data handling (skip/count or fail fast), no panic, no hang, exact resume.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use dinov2_data::augment::{BlurProbabilities, CropsConfig, DataAugmentationDino};
use dinov2_data::collate::{Batch, MaskCollate};
use dinov2_data::dataset::{Dataset, FileDataset, ImageNetSplit, Sample, TarDataset};
use dinov2_data::loader::{
    BadDataPolicy, DinoPipeline, EvalPipeline, Loader, LoaderConfig, Pipeline,
};
use dinov2_data::sampler::{EpochSampler, ShardedInfiniteSampler};
use dinov2_data::{DecodeOptions, Error, Preprocess};
use rand_chacha::ChaCha8Rng;

fn png_bytes(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 + seed * 31) as u8,
            (y * 5 + seed * 17) as u8,
            ((x * y + seed) % 251) as u8,
        ])
    });
    let mut c = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut c, image::ImageFormat::Png)
        .unwrap();
    c.into_inner()
}

/// root/{cat,dog}/... with 6 good images per class and 3 bad files in `cat`.
fn make_folder(root: &Path) {
    for (ci, c) in ["cat", "dog"].iter().enumerate() {
        let d = root.join(c);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        for i in 0..6u32 {
            let p = if i % 2 == 0 {
                d.join(format!("{i}.png"))
            } else {
                d.join("sub").join(format!("{i}.PNG"))
            };
            std::fs::write(p, png_bytes(40 + i, 30 + 2 * i, i + 10 * ci as u32)).unwrap();
        }
    }
    std::fs::write(root.join("cat/empty.jpg"), b"").unwrap();
    std::fs::write(root.join("cat/text.png"), b"not an image").unwrap();
    let good = png_bytes(50, 50, 99);
    std::fs::write(root.join("cat/truncated.png"), &good[..good.len() / 3]).unwrap();
    std::fs::write(
        root.join("cat/notes.txt"),
        b"ignored: not an image extension",
    )
    .unwrap();
}

fn pipeline() -> Arc<DinoPipeline> {
    let crops = CropsConfig {
        global_crops_size: 28,
        local_crops_size: 14,
        local_crops_number: 2,
        ..Default::default()
    };
    Arc::new(DinoPipeline {
        augmentation: DataAugmentationDino::new(crops, BlurProbabilities::RELEASED).unwrap(),
        masking: MaskCollate::official(28, 14),
    })
}

/// The first `batches` batches, and the number of bad samples skipped to make them. The count comes from the
/// stream positions (draws - good samples), not from `Loader::bad_data`: the producer runs ahead of the consumer by
/// up to `prefetch` batches, so the report at a given moment depends on timing.
fn run(ds: Arc<dyn Dataset>, threads: usize, batches: usize, quiet: bool) -> (Vec<Batch>, usize) {
    let sampler = ShardedInfiniteSampler::new(ds.len(), 3, 0, 1, true).unwrap();
    let cfg = LoaderConfig {
        batch_size: 4,
        num_threads: threads,
        prefetch: 2,
        seed: 42,
        warn: !quiet,
        ..Default::default()
    };
    let mut loader = Loader::new(ds, sampler, pipeline(), cfg).unwrap();
    let loaded: Vec<_> = loader.by_ref().take(batches).map(|b| b.unwrap()).collect();
    let draws = loaded.last().map_or(0, |l| l.next_position) as usize;
    let good: usize = loaded.iter().map(|l| l.batch.indices.len()).sum();
    assert!(loader.bad_data().skipped >= draws - good);
    (loaded.into_iter().map(|l| l.batch).collect(), draws - good)
}

#[test]
fn image_folder_labels_and_listing() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let ds = FileDataset::image_folder(dir.path()).unwrap();
    assert_eq!(ds.classes, vec!["cat", "dog"]);
    assert_eq!(
        ds.len(),
        15,
        "6 + 3 bad image-named files in cat, 6 in dog; .txt ignored"
    );
    assert_eq!(ds.entries.iter().filter(|e| e.1 == Some(1)).count(), 6);
    let un = FileDataset::unlabeled_folder(dir.path()).unwrap();
    assert_eq!(un.len(), 15);
    assert!(un.entries.iter().all(|e| e.1.is_none()));
    // ImageNet layout = ImageFolder on root/train with wnid names from labels.txt
    let inet = tempfile::tempdir().unwrap();
    make_folder(&inet.path().join("train"));
    std::fs::write(
        inet.path().join("labels.txt"),
        "cat,Felis catus\ndog,Canis familiaris\n",
    )
    .unwrap();
    let ds = FileDataset::imagenet(inet.path(), ImageNetSplit::Train).unwrap();
    assert_eq!(ds.classes, vec!["cat,Felis catus", "dog,Canis familiaris"]);
    assert!(FileDataset::imagenet(inet.path(), ImageNetSplit::Val).is_err());
}

#[test]
fn file_lists_txt_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let csv = dir.path().join("list.csv");
    std::fs::write(
        &csv,
        "path,label\ncat/0.png,3\n\"dog/0.png\",5\ndog/2.png,\n",
    )
    .unwrap();
    let ds = FileDataset::file_list(&csv).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.label(0), Some(3));
    assert_eq!(ds.label(1), Some(5));
    assert_eq!(ds.label(2), None);
    assert_eq!(
        ds.get(1, &DecodeOptions::default())
            .unwrap()
            .image
            .dimensions(),
        (40, 30)
    );
    let txt = dir.path().join("list.txt");
    std::fs::write(&txt, "# comment\ncat/0.png 1\n\ndog/sub/1.PNG\n").unwrap();
    let ds = FileDataset::file_list(&txt).unwrap();
    assert_eq!(ds.entries.len(), 2);
    assert_eq!((ds.label(0), ds.label(1)), (Some(1), None));
    std::fs::write(&csv, "a.png,1\nb.png,x\n").unwrap();
    assert!(matches!(
        FileDataset::file_list(&csv),
        Err(Error::BadLabel { line: 2, ref label, .. }) if label == "x"
    ));
}

#[test]
fn loader_is_deterministic_across_thread_counts_and_skips_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let ds: Arc<dyn Dataset> = Arc::new(FileDataset::image_folder(dir.path()).unwrap());
    let (a, skipped_a) = run(ds.clone(), 1, 6, false);
    let (b, skipped_b) = run(ds.clone(), 3, 6, true);
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "batches must not depend on the number of threads");
    assert_eq!(skipped_a, skipped_b);
    assert!(
        skipped_a >= 3,
        "24+ draws over 15 files must hit the 3 bad ones: {skipped_a}"
    );
    for batch in &a {
        assert_eq!(batch.indices.len(), 4);
        assert_eq!(batch.global_shape, [8, 3, 28, 28]);
        assert_eq!(batch.local_shape, [8, 3, 14, 14]);
        assert_eq!(batch.masks.n_crops, 8);
        // bad files never make it into a batch
        for &i in &batch.indices {
            let name = ds.describe(i);
            assert!(
                !name.contains("empty") && !name.contains("text") && !name.contains("truncated"),
                "{name}"
            );
        }
    }
    // a different seed gives different augmentations
    let sampler = ShardedInfiniteSampler::new(ds.len(), 3, 0, 1, true).unwrap();
    let cfg = LoaderConfig {
        batch_size: 4,
        num_threads: 2,
        seed: 43,
        warn: false,
        ..Default::default()
    };
    let mut l = Loader::new(ds, sampler, pipeline(), cfg).unwrap();
    assert_ne!(
        l.next().unwrap().unwrap().batch.global_crops,
        a[0].global_crops
    );
}

#[test]
fn resume_reproduces_the_rest_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let ds: Arc<dyn Dataset> = Arc::new(FileDataset::image_folder(dir.path()).unwrap());
    let mk = |start_step: u64, pos: u64| {
        let mut s = ShardedInfiniteSampler::new(ds.len(), 3, 0, 1, true).unwrap();
        s.seek(pos);
        let cfg = LoaderConfig {
            batch_size: 4,
            num_threads: 2,
            seed: 42,
            start_step,
            warn: false,
            ..Default::default()
        };
        Loader::new(ds.clone(), s, pipeline(), cfg).unwrap()
    };
    let full: Vec<_> = mk(0, 0).take(5).map(|b| b.unwrap()).collect();
    let resumed: Vec<_> = mk(full[1].step + 1, full[1].next_position)
        .take(3)
        .map(|b| b.unwrap())
        .collect();
    for (x, y) in full[2..].iter().zip(&resumed) {
        assert_eq!(x.step, y.step);
        assert_eq!(x.batch, y.batch);
    }
}

#[test]
fn fail_fast_and_all_bad_datasets_end_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let ds: Arc<dyn Dataset> = Arc::new(FileDataset::image_folder(dir.path()).unwrap());
    let sampler = EpochSampler::new(ds.len(), 0, 1, None).unwrap();
    let cfg = LoaderConfig {
        batch_size: 4,
        num_threads: 2,
        bad_data: BadDataPolicy::FailFast,
        warn: false,
        ..Default::default()
    };
    let items: Vec<_> = Loader::new(ds, sampler, pipeline(), cfg).unwrap().collect();
    assert!(
        items.last().unwrap().is_err(),
        "fail fast must yield the error"
    );
    assert!(matches!(items.last(), Some(Err(Error::Decode { .. }))));

    let bad = tempfile::tempdir().unwrap();
    std::fs::create_dir(bad.path().join("c")).unwrap();
    for i in 0..5 {
        std::fs::write(bad.path().join(format!("c/{i}.jpg")), b"garbage").unwrap();
    }
    let ds: Arc<dyn Dataset> = Arc::new(FileDataset::image_folder(bad.path()).unwrap());
    let sampler = ShardedInfiniteSampler::new(ds.len(), 0, 0, 1, true).unwrap();
    let cfg = LoaderConfig {
        batch_size: 2,
        num_threads: 2,
        max_consecutive_bad: 20,
        warn: false,
        ..Default::default()
    };
    let mut l = Loader::new(ds, sampler, pipeline(), cfg).unwrap();
    assert!(matches!(
        l.next(),
        Some(Err(Error::TooManyBadSamples { count: 20, .. }))
    ));
    assert!(l.next().is_none());
    let rep = l.bad_data();
    assert_eq!(rep.samples.len(), 5, "one entry per distinct bad file");
    assert!(rep.skipped >= 20);
}

struct PanicsOn(usize);
impl Pipeline for PanicsOn {
    type Item = u32;
    type Output = Vec<u32>;
    fn process(&self, s: Sample, _: &mut ChaCha8Rng) -> dinov2_data::Result<u32> {
        if s.image.width() as usize == self.0 {
            panic!("boom");
        }
        Ok(s.image.width())
    }
    fn collate(
        &self,
        items: Vec<u32>,
        _: Vec<usize>,
        _: Vec<Option<i64>>,
        _: &mut ChaCha8Rng,
    ) -> Vec<u32> {
        items
    }
}

#[test]
fn a_panicking_worker_is_a_skipped_sample_and_eval_epoch_ends() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let ds: Arc<dyn Dataset> =
        Arc::new(FileDataset::unlabeled_folder(dir.path().join("dog")).unwrap());
    let n = ds.len();
    let sampler = EpochSampler::new(n, 0, 1, None).unwrap();
    let cfg = LoaderConfig {
        batch_size: 4,
        num_threads: 2,
        warn: false,
        ..Default::default()
    };
    let mut l = Loader::new(ds.clone(), sampler, Arc::new(PanicsOn(42)), cfg).unwrap();
    let widths: Vec<u32> = l.by_ref().flat_map(|b| b.unwrap().batch).collect();
    assert_eq!(widths.len(), n - 1);
    assert!(!widths.contains(&42));
    assert!(matches!(l.bad_data().samples[0].reason.as_str(), r if r.contains("boom")));
    // eval pipeline over an epoch: every sample once, partial last batch kept
    let sampler = EpochSampler::new(n, 0, 1, None).unwrap();
    let cfg = LoaderConfig {
        batch_size: 4,
        num_threads: 2,
        warn: false,
        ..Default::default()
    };
    let p = Arc::new(EvalPipeline {
        preprocess: Preprocess::Eval {
            resize: 32,
            crop: 28,
        },
    });
    let batches: Vec<_> = Loader::new(ds, sampler, p, cfg)
        .unwrap()
        .map(|b| b.unwrap().batch)
        .collect();
    assert_eq!(
        batches.iter().map(|b| b.images.len()).collect::<Vec<_>>(),
        vec![4, 2]
    );
    assert!(batches
        .iter()
        .flat_map(|b| &b.images)
        .all(|t| t.shape() == [3, 28, 28]));
}

#[test]
fn dropping_a_loader_midway_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let ds: Arc<dyn Dataset> = Arc::new(FileDataset::image_folder(dir.path()).unwrap());
    let sampler = ShardedInfiniteSampler::new(ds.len(), 0, 0, 1, true).unwrap();
    let cfg = LoaderConfig {
        batch_size: 2,
        num_threads: 2,
        prefetch: 1,
        warn: false,
        ..Default::default()
    };
    let mut l = Loader::new(ds, sampler, pipeline(), cfg).unwrap();
    assert!(l.next().unwrap().is_ok());
    drop(l); // infinite sampler, full queue: Drop must stop the producer
}

/// Minimal ustar writer (test helper, independent from the reader under test).
fn tar_member(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

#[test]
fn tar_shards_with_labels_and_a_truncated_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Vec::new();
    for i in 0..3u32 {
        tar_member(&mut t, &format!("s/{i:04}.png"), &png_bytes(20 + i, 10, i));
        tar_member(
            &mut t,
            &format!("s/{i:04}.cls"),
            format!("{}", 7 + i).as_bytes(),
        );
    }
    tar_member(&mut t, "s/broken.jpg", b"not a jpeg");
    t.extend_from_slice(&[0u8; 1024]);
    std::fs::write(dir.path().join("a.tar"), &t).unwrap();
    let mut t2 = Vec::new();
    tar_member(&mut t2, "x/0.png", &png_bytes(33, 11, 5));
    let second = t2.len();
    let p1 = png_bytes(34, 11, 6);
    tar_member(&mut t2, "x/1.png", &p1);
    let cut = second + 512 + p1.len() / 2; // second member's data truncated
    std::fs::File::create(dir.path().join("b.tar"))
        .unwrap()
        .write_all(&t2[..cut])
        .unwrap();
    let ds = TarDataset::open_dir(dir.path()).unwrap();
    assert_eq!(
        ds.len(),
        5,
        "3 png + broken.jpg in a.tar, 1 complete png in b.tar"
    );
    assert_eq!(ds.warnings.len(), 1, "{:?}", ds.warnings);
    let o = DecodeOptions::default();
    for i in 0..3 {
        let s = ds.get(i, &o).unwrap();
        assert_eq!(s.image.width(), 20 + i as u32);
        assert_eq!(s.label, Some(7 + i as i64));
    }
    assert!(matches!(ds.get(3, &o), Err(Error::Decode { .. })));
    assert_eq!(ds.get(4, &o).unwrap().image.width(), 33);
    assert!(ds.describe(3).ends_with("a.tar:s/broken.jpg"));
}

#[test]
fn image_extensions_are_exactly_what_image_decodes() {
    use image::ImageFormat;
    for ext in dinov2_data::IMAGE_EXTENSIONS {
        let format = ImageFormat::from_extension(ext);
        assert!(
            format.is_some_and(|f| f.reading_enabled()),
            "{ext} is listed but not decodable"
        );
    }
    for format in ImageFormat::all().filter(|f| f.reading_enabled()) {
        for ext in format.extensions_str() {
            assert!(
                dinov2_data::IMAGE_EXTENSIONS.contains(ext),
                "{format:?} decodes .{ext}, which is not listed"
            );
        }
    }
}

#[test]
fn open_dataset_reads_a_folder_recursively_in_every_decodable_format() {
    let dir = tempfile::tempdir().unwrap();
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
        6,
        4,
        image::Rgb([10, 200, 30]),
    ));
    std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
    let files = [
        ("a/b/deep.png", image::ImageFormat::Png),
        ("photo.JFIF", image::ImageFormat::Jpeg),
        ("a/grey.pgm", image::ImageFormat::Pnm),
        ("a/colour.ppm", image::ImageFormat::Pnm),
        ("x.tif", image::ImageFormat::Tiff),
        ("y.webp", image::ImageFormat::WebP),
        ("z.bmp", image::ImageFormat::Bmp),
        ("g.gif", image::ImageFormat::Gif),
    ];
    for (name, format) in files {
        let img = if name.ends_with("pgm") {
            image::DynamicImage::ImageLuma8(img.to_luma8())
        } else {
            img.clone()
        };
        img.save_with_format(dir.path().join(name), format).unwrap();
    }
    std::fs::write(dir.path().join("a/readme.md"), "not an image").unwrap();
    let ds = dinov2_data::open_dataset(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(ds.len(), files.len());
    for i in 0..ds.len() {
        let s = ds
            .get(i, &DecodeOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", ds.describe(i)));
        assert_eq!(
            (s.image.dimensions(), s.label),
            ((6, 4), None),
            "{}",
            ds.describe(i)
        );
    }
}

#[test]
fn open_dataset_parses_the_dataset_string_forms() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_folder(&root.join("folder"));
    make_folder(&root.join("inet/val"));
    let show = |p: &str| root.join(p).display().to_string();
    let dims = |ds: &Arc<dyn Dataset>, i| {
        ds.get(i, &DecodeOptions::default())
            .unwrap()
            .image
            .dimensions()
    };
    // ImageFolder: labelled by subfolder
    let ds = dinov2_data::open_dataset(&format!("ImageFolder:root={}", show("folder"))).unwrap();
    let expected = FileDataset::image_folder(root.join("folder")).unwrap();
    assert_eq!(
        (ds.len(), ds.label(0), ds.label(14)),
        (expected.len(), Some(0), Some(1))
    );
    // ImageNet: split in either case, the official extra accepted
    for spec in [
        format!("ImageNet:split=VAL:root={}", show("inet")),
        format!("ImageNet:root={}:split=val:extra=/unused", show("inet")),
    ] {
        let ds = dinov2_data::open_dataset(&spec).unwrap();
        assert_eq!((ds.len(), ds.label(14)), (15, Some(1)), "{spec}");
    }
    // FileList, relative to the list's folder or to root
    std::fs::write(
        root.join("list.txt"),
        "folder/cat/0.png 3\nfolder/dog/2.png 4\n",
    )
    .unwrap();
    std::fs::write(root.join("folder/rel.txt"), "cat/0.png\n").unwrap();
    let ds = dinov2_data::open_dataset(&format!("FileList:path={}", show("list.txt"))).unwrap();
    assert_eq!((ds.len(), ds.label(1)), (2, Some(4)));
    assert_eq!(dims(&ds, 0), (40, 30));
    let spec = format!(
        "FileList:path={}:root={}",
        show("folder/rel.txt"),
        show("folder")
    );
    let ds = dinov2_data::open_dataset(&spec).unwrap();
    assert_eq!(dims(&ds, 0), (40, 30));
    // Tar: a folder of shards, or one shard
    std::fs::create_dir(root.join("shards")).unwrap();
    for (shard, n) in [("a.tar", 2u32), ("b.tar", 3)] {
        let mut t = Vec::new();
        for i in 0..n {
            tar_member(&mut t, &format!("s/{i}.png"), &png_bytes(8 + i, 8, i));
        }
        t.extend_from_slice(&[0u8; 1024]);
        std::fs::write(root.join("shards").join(shard), &t).unwrap();
    }
    let ds = dinov2_data::open_dataset(&format!("Tar:root={}", show("shards"))).unwrap();
    assert_eq!(ds.len(), 5);
    let ds = dinov2_data::open_dataset(&format!("Tar:root={}", show("shards/b.tar"))).unwrap();
    assert_eq!((ds.len(), dims(&ds, 2)), (3, (10, 8)));
}

#[test]
fn open_dataset_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let root = dir.path().display().to_string();
    let missing = dir.path().join("missing").display().to_string();
    let spec_key = |spec: &str| match dinov2_data::open_dataset(spec) {
        Err(Error::DatasetSpec { key, reason, .. }) => (key, reason),
        Err(other) => panic!("{spec}: {other}"),
        Ok(_) => panic!("{spec}: opened"),
    };
    for spec in [
        missing.clone(),
        "relative/missing".into(),
        format!("ImageFolder:root={missing}"),
    ] {
        match dinov2_data::open_dataset(&spec) {
            Err(e @ Error::DatasetNotFound { .. }) => {
                assert!(e.to_string().contains("ImageFolder:root=DIR"), "{e}")
            }
            Err(other) => panic!("{spec}: {other}"),
            Ok(_) => panic!("{spec}: opened"),
        }
    }
    for spec in ["ImageNet22k", "Places:root=/x", "ImageNet22k:split=TRAIN"] {
        let err = dinov2_data::open_dataset(spec).err().unwrap();
        assert!(matches!(err, Error::UnknownDataset { .. }), "{spec}: {err}");
        assert!(
            err.to_string()
                .contains("FileList:path=FILE[:root=DIR], Tar:root=DIR"),
            "{err}"
        );
    }
    let (key, reason) = spec_key(&format!("ImageFolder:root={root}:split=TRAIN"));
    assert_eq!(
        (key.as_str(), reason.contains("valid keys: root")),
        ("split", true),
        "{reason}"
    );
    assert_eq!(spec_key("ImageFolder").0, "root");
    assert_eq!(spec_key(&format!("ImageNet:root={root}")).0, "split");
    assert_eq!(
        spec_key(&format!("ImageNet:split=TEST:root={root}")).0,
        "split"
    );
    assert_eq!(
        spec_key(&format!("ImageFolder:root={root}:root={root}")).0,
        "root"
    );
    assert_eq!(spec_key("ImageFolder:rootdir").0, "rootdir");
    assert_eq!(
        spec_key(&dir.path().join("cat/0.png").display().to_string()).0,
        ""
    );
    // the datasets' own errors come through
    let empty = tempfile::tempdir().unwrap();
    let spec = format!("ImageFolder:root={}", empty.path().display());
    assert!(matches!(
        dinov2_data::open_dataset(&spec),
        Err(Error::NoClassFolders { .. })
    ));
    assert!(matches!(
        dinov2_data::open_dataset(empty.path().to_str().unwrap()),
        Err(Error::NoImages { .. })
    ));
}
