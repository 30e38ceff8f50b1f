//! `hub::download` / `resolve_weights` against a local Hub stand-in (never the real network).

mod common_hub;

use std::path::{Path, PathBuf};

use common_hub::{etag_of, HubServer, ServedRepo};
use dinov2_model::hub::{cached_snapshot, download, resolve_weights, HubOptions, MODEL_FILES};
use dinov2_model::weights::{load_weights, WeightFormat};
use dinov2_model::Error;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixture_hf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plain/hf")
}

fn opts(endpoint: &str, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: endpoint.to_string(),
        cache_dir: cache.to_path_buf(),
        offline: false,
        token: None,
        revision: "main".into(),
        progress: false,
    }
}

fn small_repo() -> ServedRepo {
    ServedRepo::from_dir("facebook/dinov2-small", COMMIT, &fixture_hf())
}

#[test]
fn download_fills_the_standard_cache_layout_and_is_cached_afterwards() {
    let server = HubServer::start(vec![small_repo()]);
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&server.endpoint(), cache.path());

    // The official short name maps to the Hub repository.
    let snap = download("dinov2_vits14", &o).unwrap();
    let repo_dir = cache.path().join("models--facebook--dinov2-small");
    assert_eq!(snap, repo_dir.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    for f in MODEL_FILES {
        let want = std::fs::read(fixture_hf().join(f)).unwrap();
        let link = snap.join(f);
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{f} is a symlink"
        );
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../../blobs").join(etag_of(&want))
        );
        assert_eq!(
            std::fs::read(repo_dir.join("blobs").join(etag_of(&want))).unwrap(),
            want,
            "{f}"
        );
    }
    let reqs = server.requests();
    assert!(reqs
        .iter()
        .all(|r| r.method == "GET" && r.path.starts_with("/facebook/dinov2-small/resolve/main/")));
    assert!(reqs
        .iter()
        .all(|r| !r.headers.contains_key("authorization")));
    assert!(reqs.iter().any(|r| r.path.ends_with("/model.safetensors")));

    // What came down loads like the fixture directory itself.
    let a = load_weights(&snap).unwrap();
    let b = load_weights(fixture_hf()).unwrap();
    assert_eq!(a.format, WeightFormat::Transformers);
    assert_eq!(a.config, b.config);
    assert_eq!(a.state_dict.len(), b.state_dict.len());

    // Server gone: the cached snapshot resolves with no network, by Hub id too, and offline.
    server.shutdown();
    assert_eq!(download("facebook/dinov2-small", &o).unwrap(), snap);
    let off = HubOptions {
        offline: true,
        ..o.clone()
    };
    assert_eq!(download("dinov2_vits14", &off).unwrap(), snap);
    assert_eq!(
        cached_snapshot("facebook/dinov2-small", &off),
        Some(snap.clone())
    );
    // Revision pinned by commit hash: found in snapshots/ directly.
    let pinned = HubOptions {
        revision: COMMIT.into(),
        ..off
    };
    assert_eq!(download("facebook/dinov2-small", &pinned).unwrap(), snap);
}

#[test]
fn offline_with_an_empty_cache_is_a_clear_error_and_sends_nothing() {
    let server = HubServer::start(vec![small_repo()]);
    let cache = tempfile::tempdir().unwrap();
    let o = HubOptions {
        offline: true,
        ..opts(&server.endpoint(), cache.path())
    };
    match download("dinov2_vits14_reg", &o) {
        Err(e @ Error::Hub { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("facebook/dinov2-with-registers-small"),
                "{msg}"
            );
            assert!(msg.contains(&cache.path().display().to_string()), "{msg}");
            assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert!(server.requests().is_empty());
}

#[test]
fn a_python_populated_cache_is_used_offline() {
    // The layout huggingface_hub writes, made by hand (files may also be plain copies, not symlinks).
    let cache = tempfile::tempdir().unwrap();
    let repo_dir = cache.path().join("models--facebook--dinov2-base");
    let snap = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    for f in MODEL_FILES {
        std::fs::copy(fixture_hf().join(f), snap.join(f)).unwrap();
    }
    let o = HubOptions {
        offline: true,
        ..opts("http://127.0.0.1:9", cache.path())
    };
    assert_eq!(download("dinov2_vitb14", &o).unwrap(), snap);
    // Without refs/main but with a pinned commit.
    std::fs::remove_file(repo_dir.join("refs/main")).unwrap();
    assert!(download("dinov2_vitb14", &o).is_err());
    let pinned = HubOptions {
        revision: COMMIT.into(),
        ..o
    };
    assert_eq!(download("dinov2_vitb14", &pinned).unwrap(), snap);
}

#[test]
fn missing_repositories_files_and_tokens_are_hub_errors() {
    let mut gated = small_repo();
    gated.id = "facebook/dinov2-gated".into();
    gated.token = Some("hf_secret".into());
    let mut partial = small_repo();
    partial.id = "someone/no-weights".into();
    partial.files.remove("model.safetensors");
    let server = HubServer::start(vec![small_repo(), gated, partial]);
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&server.endpoint(), cache.path());

    let err = |r: dinov2_model::Result<PathBuf>| match r {
        Err(e @ Error::Hub { .. }) => e.to_string(),
        other => panic!("{other:?}"),
    };
    let m = err(download("facebook/does-not-exist", &o));
    assert!(
        m.contains("facebook/does-not-exist") && m.contains("404"),
        "{m}"
    );
    let m = err(download("someone/no-weights", &o));
    assert!(m.contains("model.safetensors") && m.contains("404"), "{m}");
    let m = err(download("facebook/dinov2-gated", &o));
    assert!(m.contains("401") && m.contains("HF_TOKEN"), "{m}");
    let m = err(download(
        "facebook/dinov2-small",
        &HubOptions {
            revision: "v9".into(),
            ..o.clone()
        },
    ));
    assert!(m.contains("v9"), "{m}");

    let with_token = HubOptions {
        token: Some("hf_secret".into()),
        ..o.clone()
    };
    let snap = download("facebook/dinov2-gated", &with_token).unwrap();
    assert!(snap.join("model.safetensors").is_file());
    assert!(server
        .requests()
        .iter()
        .any(|r| r.headers.get("authorization").map(String::as_str) == Some("Bearer hf_secret")));
    // A name that is neither an official model nor a Hub id.
    assert!(matches!(
        download("vit_tiny", &o),
        Err(Error::UnknownModel { .. })
    ));
}

#[test]
fn resolve_weights_prefers_existing_paths() {
    let server = HubServer::start(vec![small_repo()]);
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&server.endpoint(), cache.path());
    let local = fixture_hf();
    let spec = local.to_str().unwrap();
    assert_eq!(resolve_weights(spec, &o).unwrap(), local);
    assert!(server.requests().is_empty());
    let snap = resolve_weights("facebook/dinov2-small", &o).unwrap();
    assert!(snap.starts_with(cache.path()));
    assert!(matches!(
        resolve_weights("./missing/weights.pth", &o),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        resolve_weights("dinov2_vitz14", &o),
        Err(Error::UnknownModel { .. })
    ));
}

#[test]
fn lfs_files_behind_a_cdn_redirect_download_like_on_the_hub() {
    let mut repo = small_repo();
    repo.lfs_redirect = true;
    let server = HubServer::start(vec![repo]);
    let cache = tempfile::tempdir().unwrap();
    let snap = download(
        "facebook/dinov2-small",
        &opts(&server.endpoint(), cache.path()),
    )
    .unwrap();
    let want = std::fs::read(fixture_hf().join("model.safetensors")).unwrap();
    // The blob is named after the content hash of X-Linked-Etag, not the redirect's own ETag.
    assert_eq!(
        std::fs::read_link(snap.join("model.safetensors")).unwrap(),
        Path::new("../../blobs").join(etag_of(&want))
    );
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), want);
    let reqs = server.requests();
    assert!(reqs.iter().any(|r| r
        .path
        .starts_with("/cdn/facebook/dinov2-small/model.safetensors")));
    assert!(load_weights(&snap).is_ok());
}

#[test]
fn an_interrupted_download_resumes_from_its_part_file() {
    let server = HubServer::start(vec![small_repo()]);
    let cache = tempfile::tempdir().unwrap();
    let want = std::fs::read(fixture_hf().join("model.safetensors")).unwrap();
    // What an interrupted transfer leaves: blobs/<etag>.part holding a prefix of the file.
    let blobs = cache.path().join("models--facebook--dinov2-small/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let half = want.len() / 2;
    std::fs::write(
        blobs.join(format!("{}.part", etag_of(&want))),
        &want[..half],
    )
    .unwrap();
    let snap = download(
        "facebook/dinov2-small",
        &opts(&server.endpoint(), cache.path()),
    )
    .unwrap();
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), want);
    let ranges: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/model.safetensors"))
        .filter_map(|r| r.headers.get("range").cloned())
        .collect();
    assert!(ranges.contains(&format!("bytes={half}-")), "{ranges:?}");
}
