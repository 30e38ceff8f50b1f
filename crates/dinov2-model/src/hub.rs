//! Hugging Face Hub download and cache resolution.
//!
//! [`download`] fetches a model's `config.json` and `model.safetensors` into the standard Hugging Face cache
//! (`models--{org}--{name}/{blobs,refs,snapshots}`, shared with the Python `huggingface_hub` client) and returns
//! the snapshot directory, which [`crate::weights::load_weights`] reads. A cached snapshot is used without any
//! network access; [`HubOptions::offline`] (`HF_HUB_OFFLINE=1`) forbids the network altogether.
//!
//! [`HubOptions::from_env`] reads the same environment variables as the Python client:
//!
//! | variable | meaning |
//! |---|---|
//! | `HF_ENDPOINT` | Hub URL (default `https://huggingface.co`) |
//! | `HF_HUB_CACHE` > `HUGGINGFACE_HUB_CACHE` > `$HF_HOME/hub` > `$XDG_CACHE_HOME/huggingface/hub` > `~/.cache/huggingface/hub` | cache directory |
//! | `HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`): `1`/`true`/`yes`/`on` | no network |
//! | `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the file `HF_TOKEN_PATH` or `$HF_HOME/token` | access token |
//! | `HF_HUB_DISABLE_PROGRESS_BARS` | no progress bar |

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::config::OfficialModel;
use crate::error::{Error, Result};

/// The files [`download`] fetches (and a cached snapshot must hold; see [`cached_snapshot`]).
pub const MODEL_FILES: [&str; 2] = ["config.json", "model.safetensors"];

/// Where and how to reach the Hub. Its `Debug` output hides the token.
///
/// ```
/// use dinov2_model::hub::HubOptions;
/// let opts = HubOptions {
///     cache_dir: "/data/models".into(),
///     offline: true, // only what is already in `/data/models`
///     token: Some("hf_secret".into()),
///     ..HubOptions::from_env_with(|_| None) // defaults, whatever the process environment says
/// };
/// assert_eq!(opts.revision, "main");
/// assert!(!format!("{opts:?}").contains("hf_secret"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Hub URL without a trailing slash, e.g. `https://huggingface.co`.
    pub endpoint: String,
    /// The cache directory holding `models--{org}--{name}` folders.
    pub cache_dir: PathBuf,
    /// Never touch the network: only cached snapshots resolve.
    pub offline: bool,
    /// Access token (sent as `Authorization: Bearer …`), for private or gated repositories.
    pub token: Option<String>,
    /// Branch, tag or commit hash (`main` by default).
    pub revision: String,
    /// Show a progress bar while downloading.
    pub progress: bool,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("revision", &self.revision)
            .field("progress", &self.progress)
            .finish()
    }
}

fn truthy(v: Option<String>) -> bool {
    v.map(|s| {
        matches!(
            s.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
    .unwrap_or(false)
}

impl HubOptions {
    /// Options from the process environment, as the Python `huggingface_hub` client reads them
    /// (see the [module docs](self)).
    ///
    /// ```
    /// let opts = dinov2_model::hub::HubOptions::from_env();
    /// assert_eq!(opts.revision, "main");
    /// ```
    pub fn from_env() -> Self {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// [`HubOptions::from_env`] with the environment given as a lookup function (handy for tests and for
    /// embedding applications with their own settings). The token file, when no token variable is set, is
    /// read from disk.
    ///
    /// ```
    /// use dinov2_model::hub::HubOptions;
    /// use std::path::PathBuf;
    /// let env = |k: &str| match k {
    ///     "HF_HOME" => Some("/data/hf".to_string()),
    ///     "HF_HUB_OFFLINE" => Some("1".to_string()),
    ///     _ => None,
    /// };
    /// let o = HubOptions::from_env_with(env);
    /// assert_eq!(o.cache_dir, PathBuf::from("/data/hf/hub"));
    /// assert!(o.offline);
    /// assert_eq!(o.endpoint, "https://huggingface.co");
    /// ```
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let home = get("HOME").or_else(|| get("USERPROFILE"));
        let expand = |p: String| -> PathBuf {
            match (
                p.strip_prefix("~/").or_else(|| (p == "~").then_some("")),
                &home,
            ) {
                (Some(rest), Some(h)) => Path::new(h).join(rest),
                _ => PathBuf::from(p),
            }
        };
        let hf_home = match get("HF_HOME") {
            Some(h) => expand(h),
            None => match get("XDG_CACHE_HOME") {
                Some(x) => expand(x).join("huggingface"),
                None => expand("~/.cache".to_string()).join("huggingface"),
            },
        };
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = get("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        let offline = truthy(get("HF_HUB_OFFLINE").or_else(|| get("TRANSFORMERS_OFFLINE")));
        let clean = |t: String| Some(t.trim().to_string()).filter(|t| !t.is_empty());
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .and_then(clean)
            .or_else(|| {
                let file = get("HF_TOKEN_PATH")
                    .map(expand)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(file).ok().and_then(clean)
            });
        let progress = !truthy(get("HF_HUB_DISABLE_PROGRESS_BARS"));
        HubOptions {
            endpoint,
            cache_dir,
            offline,
            token,
            revision: "main".to_string(),
            progress,
        }
    }
}

/// The Hub repository of a model name: an official short name (`dinov2_vits14_reg` →
/// `facebook/dinov2-with-registers-small`) or a Hub id `org/name`, returned as is.
///
/// ```
/// use dinov2_model::hub::hub_repo_id;
/// assert_eq!(hub_repo_id("dinov2_vitg14").unwrap(), "facebook/dinov2-giant");
/// assert_eq!(hub_repo_id("someone/dinov2-finetuned").unwrap(), "someone/dinov2-finetuned");
/// assert!(hub_repo_id("vit_tiny").is_err());
/// ```
pub fn hub_repo_id(repo_or_name: &str) -> Result<String> {
    if let Ok(m) = repo_or_name.parse::<OfficialModel>() {
        return Ok(m.hf_repo());
    }
    let s = repo_or_name.trim();
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['-', '.'])
            && !p.ends_with('.')
            && !p.contains("..")
            && !p.contains("--")
            && p.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    };
    match s.split_once('/') {
        Some((org, name)) if part_ok(org) && part_ok(name) => Ok(s.to_string()),
        _ => Err(Error::UnknownModel {
            spec: repo_or_name.to_string(),
        }),
    }
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|c| c.is_ascii_hexdigit())
}

/// The cache folder of a model repository (`{cache}/models--{org}--{name}`).
///
/// ```
/// use dinov2_model::hub::{hub_repo_id, repo_cache_dir, HubOptions};
/// let opts = HubOptions::from_env_with(|k| (k == "HF_HUB_CACHE").then(|| "/data/hub".to_string()));
/// let dir = repo_cache_dir(&hub_repo_id("dinov2_vits14")?, &opts);
/// assert_eq!(dir, std::path::Path::new("/data/hub/models--facebook--dinov2-small"));
/// # Ok::<(), dinov2_model::Error>(())
/// ```
pub fn repo_cache_dir(repo_id: &str, opts: &HubOptions) -> PathBuf {
    opts.cache_dir
        .join(format!("models--{}", repo_id.replace('/', "--")))
}

/// The snapshot directory of `repo_id` at `opts.revision` if it is cached with every file of [`MODEL_FILES`];
/// pure file-system lookup (no network). A commit-hash revision is looked up directly, a branch or tag through
/// `refs/{revision}`, as the Python client does.
///
/// ```
/// use dinov2_model::hub::{cached_snapshot, repo_cache_dir, HubOptions, MODEL_FILES};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cache = tempfile::tempdir()?;
/// let opts = HubOptions { cache_dir: cache.path().to_path_buf(), ..HubOptions::from_env_with(|_| None) };
/// assert_eq!(cached_snapshot("facebook/dinov2-small", &opts), None);
/// // The layout the Python client (and `download`) leaves behind.
/// let repo = repo_cache_dir("facebook/dinov2-small", &opts);
/// let commit = "0123456789abcdef0123456789abcdef01234567";
/// let snap = repo.join("snapshots").join(commit);
/// std::fs::create_dir_all(&snap)?;
/// std::fs::create_dir_all(repo.join("refs"))?;
/// std::fs::write(repo.join("refs").join("main"), commit)?;
/// std::fs::write(snap.join(MODEL_FILES[0]), b"{}")?;
/// assert_eq!(cached_snapshot("facebook/dinov2-small", &opts), None); // model.safetensors still missing
/// std::fs::write(snap.join(MODEL_FILES[1]), b"")?;
/// assert_eq!(cached_snapshot("facebook/dinov2-small", &opts), Some(snap));
/// # Ok(()) }
/// ```
pub fn cached_snapshot(repo_id: &str, opts: &HubOptions) -> Option<PathBuf> {
    let repo_dir = repo_cache_dir(repo_id, opts);
    let commit = if is_commit_hash(&opts.revision) {
        opts.revision.clone()
    } else {
        let r = std::fs::read_to_string(repo_dir.join("refs").join(&opts.revision)).ok()?;
        r.trim().to_string()
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.contains("..") {
        return None;
    }
    let snap = repo_dir.join("snapshots").join(commit);
    MODEL_FILES
        .iter()
        .all(|f| snap.join(f).is_file())
        .then_some(snap)
}

fn cached_file(repo_id: &str, opts: &HubOptions, file: &str) -> bool {
    let repo_dir = repo_cache_dir(repo_id, opts);
    let commit = if is_commit_hash(&opts.revision) {
        Some(opts.revision.clone())
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(&opts.revision))
            .ok()
            .map(|s| s.trim().to_string())
    };
    match commit {
        Some(c) if !c.is_empty() && !c.contains(['/', '\\']) && !c.contains("..") => {
            repo_dir.join("snapshots").join(c).join(file).is_file()
        }
        _ => false,
    }
}

/// Downloads (or finds in the cache) `config.json` and `model.safetensors` of a model and returns the snapshot
/// directory holding both.
///
/// `repo_or_name` is an official short name (`dinov2_vits14`, `dinov2_vitb14_reg`, ...) or a Hub id
/// (`facebook/dinov2-small`). A complete cached snapshot is returned without any network access; in offline
/// mode a missing one is an [`Error::Hub`] naming the repository and the cache directory.
///
/// ```no_run
/// use dinov2_model::hub::{download, HubOptions};
/// use dinov2_model::weights::load_weights;
/// # fn main() -> dinov2_model::Result<()> {
/// let dir = download("dinov2_vits14_reg", &HubOptions::from_env())?;
/// let w = load_weights(&dir)?; // transformers layout, config from config.json
/// assert_eq!(w.config.num_register_tokens, 4);
/// # Ok(())
/// # }
/// ```
///
/// Offline, only the cache answers:
///
/// ```
/// use dinov2_model::hub::{download, repo_cache_dir, HubOptions, MODEL_FILES};
/// use dinov2_model::Error;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let cache = tempfile::tempdir()?;
/// # let opts = HubOptions { cache_dir: cache.path().to_path_buf(), ..HubOptions::from_env_with(|_| None) };
/// # let repo = repo_cache_dir("facebook/dinov2-small", &opts);
/// # let commit = "0123456789abcdef0123456789abcdef01234567";
/// # let snap = repo.join("snapshots").join(commit);
/// # std::fs::create_dir_all(&snap)?;
/// # std::fs::create_dir_all(repo.join("refs"))?;
/// # std::fs::write(repo.join("refs").join("main"), commit)?;
/// # for f in MODEL_FILES { std::fs::write(snap.join(f), b"")?; }
/// // A cache holding a snapshot of facebook/dinov2-small, and nothing else.
/// assert_eq!(download("dinov2_vits14", &HubOptions { offline: true, ..opts.clone() })?, snap);
/// let err = download("dinov2_vitb14", &HubOptions { offline: true, ..opts }).unwrap_err();
/// assert!(matches!(err, Error::Hub { ref repo, .. } if repo == "facebook/dinov2-base"));
/// # Ok(()) }
/// ```
pub fn download(repo_or_name: &str, opts: &HubOptions) -> Result<PathBuf> {
    let repo = hub_repo_id(repo_or_name)?;
    if let Some(dir) = cached_snapshot(&repo, opts) {
        return Ok(dir);
    }
    if opts.offline {
        let missing: Vec<&str> = MODEL_FILES
            .iter()
            .copied()
            .filter(|f| !cached_file(&repo, opts, f))
            .collect();
        return Err(Error::Hub {
            reason: format!(
                "revision `{}` is not in the cache {} (missing: {}) and offline mode is on \
                 (HF_HUB_OFFLINE); download it once with network access or unset HF_HUB_OFFLINE",
                opts.revision,
                opts.cache_dir.display(),
                missing.join(", ")
            ),
            repo,
        });
    }
    let run = || -> Result<PathBuf> {
        let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
            .with_endpoint(opts.endpoint.clone())
            .with_token(opts.token.clone())
            .with_progress(opts.progress)
            .with_retries(3)
            .build()
            .map_err(|e| Error::Hub {
                repo: repo.clone(),
                reason: format!("cannot set up the Hub client: {e}"),
            })?;
        let api_repo = api.repo(Repo::with_revision(
            repo.clone(),
            RepoType::Model,
            opts.revision.clone(),
        ));
        // Two passes: if the branch moved between two files, the second pass fetches the first again.
        for _ in 0..2 {
            for file in MODEL_FILES {
                if cached_file(&repo, opts, file) {
                    continue;
                }
                api_repo.download(file).map_err(|e| {
                    let msg = e.to_string();
                    let hint = if msg.contains("404") {
                        " (no such repository, revision or file)"
                    } else if msg.contains("401") || msg.contains("403") {
                        " (private or gated repository: set HF_TOKEN or log in with `hf auth login`)"
                    } else {
                        ""
                    };
                    Error::Hub {
                        repo: repo.clone(),
                        reason: format!(
                            "cannot download `{file}` (revision `{}`) from {}: {msg}{hint}",
                            opts.revision, opts.endpoint
                        ),
                    }
                })?;
            }
            if let Some(dir) = cached_snapshot(&repo, opts) {
                return Ok(dir);
            }
        }
        Err(Error::Hub {
            repo: repo.clone(),
            reason: format!(
                "changed on the Hub during the download (revision `{}`); try again",
                opts.revision
            ),
        })
    };
    // hf-hub asserts on a few impossible states; never let that unwind through the caller.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|_| {
        Err(Error::Hub {
            repo: repo.clone(),
            reason: "the Hub client failed unexpectedly during the download".into(),
        })
    })
}

/// A local path if `spec` exists, else the snapshot directory of the model it names ([`download`]).
/// A spec that looks like a path (a separator at the start, more than one `/`, a weights extension) but
/// does not exist is an [`Error::Io`]; one that is neither a path nor a model name an
/// [`Error::UnknownModel`]. Neither touches the network.
///
/// ```no_run
/// use dinov2_model::hub::{resolve_weights, HubOptions};
/// # fn main() -> dinov2_model::Result<()> {
/// let hub = resolve_weights("facebook/dinov2-base", &HubOptions::from_env())?; // downloaded (or cached)
/// # Ok(())
/// # }
/// ```
///
/// ```
/// use dinov2_model::hub::{resolve_weights, HubOptions};
/// use dinov2_model::Error;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let opts = HubOptions { offline: true, ..HubOptions::from_env_with(|_| None) };
/// let file = tempfile::NamedTempFile::new()?;
/// let spec = file.path().to_str().unwrap();
/// assert_eq!(resolve_weights(spec, &opts)?, file.path()); // an existing path, returned as is
/// assert!(matches!(resolve_weights("weights/missing.pth", &opts), Err(Error::Io { .. })));
/// assert!(matches!(resolve_weights("vit_tiny", &opts), Err(Error::UnknownModel { .. })));
/// # Ok(()) }
/// ```
pub fn resolve_weights(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let looks_like_path = spec.starts_with(['/', '.', '~', '\\'])
        || spec.matches('/').count() > 1
        || [".pth", ".pt", ".safetensors", ".bin", ".json"]
            .iter()
            .any(|e| spec.ends_with(e));
    match hub_repo_id(spec) {
        Ok(_) if !looks_like_path => download(spec, opts),
        _ if looks_like_path => Err(Error::Io {
            path: p.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        }),
        _ => Err(Error::UnknownModel {
            spec: spec.to_string(),
        }),
    }
}
