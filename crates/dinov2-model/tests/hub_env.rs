//! `HubOptions::from_env_with`: the environment rules of the Python `huggingface_hub` client, checked with a
//! lookup closure (no process-environment races), and the name → repository mapping.

use std::collections::HashMap;
use std::path::PathBuf;

use dinov2_model::hub::{hub_repo_id, HubOptions};
use dinov2_model::{Error, OfficialModel};

fn with(vars: &[(&str, &str)]) -> HubOptions {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    HubOptions::from_env_with(move |k| map.get(k).cloned())
}

#[test]
fn defaults_follow_home() {
    let o = with(&[("HOME", "/home/u")]);
    assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert_eq!(o.endpoint, "https://huggingface.co");
    assert!(!o.offline);
    assert_eq!(o.token, None);
    assert_eq!(o.revision, "main");
    assert!(o.progress);
}

#[test]
fn cache_dir_precedence() {
    let base = [("HOME", "/home/u")];
    let o = with(&[base[0], ("XDG_CACHE_HOME", "/xdg")]);
    assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    let o = with(&[base[0], ("XDG_CACHE_HOME", "/xdg"), ("HF_HOME", "/hfhome")]);
    assert_eq!(o.cache_dir, PathBuf::from("/hfhome/hub"));
    let o = with(&[
        base[0],
        ("HF_HOME", "/hfhome"),
        ("HUGGINGFACE_HUB_CACHE", "/legacy"),
    ]);
    assert_eq!(o.cache_dir, PathBuf::from("/legacy"));
    let o = with(&[
        base[0],
        ("HF_HOME", "/hfhome"),
        ("HUGGINGFACE_HUB_CACHE", "/legacy"),
        ("HF_HUB_CACHE", "/hub"),
    ]);
    assert_eq!(o.cache_dir, PathBuf::from("/hub"));
    let o = with(&[base[0], ("HF_HOME", "~/hf")]);
    assert_eq!(o.cache_dir, PathBuf::from("/home/u/hf/hub"));
}

#[test]
fn endpoint_offline_progress() {
    let o = with(&[("HF_ENDPOINT", "http://127.0.0.1:8080/")]);
    assert_eq!(o.endpoint, "http://127.0.0.1:8080");
    for (v, want) in [
        ("1", true),
        ("true", true),
        ("YES", true),
        ("on", true),
        ("0", false),
        ("false", false),
        ("", false),
    ] {
        assert_eq!(
            with(&[("HF_HUB_OFFLINE", v)]).offline,
            want,
            "HF_HUB_OFFLINE={v:?}"
        );
    }
    assert!(with(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
    assert!(!with(&[("HF_HUB_DISABLE_PROGRESS_BARS", "1")]).progress);
}

#[test]
fn token_from_variable_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_str().unwrap();
    assert_eq!(with(&[("HF_HOME", home)]).token, None);
    std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
    assert_eq!(with(&[("HF_HOME", home)]).token.as_deref(), Some("hf_file"));
    assert_eq!(
        with(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")])
            .token
            .as_deref(),
        Some("hf_env")
    );
    assert_eq!(
        with(&[("HF_HOME", home), ("HUGGING_FACE_HUB_TOKEN", "hf_old")])
            .token
            .as_deref(),
        Some("hf_old")
    );
    let other = dir.path().join("elsewhere");
    std::fs::write(&other, "hf_path").unwrap();
    assert_eq!(
        with(&[
            ("HF_HOME", home),
            ("HF_TOKEN_PATH", other.to_str().unwrap())
        ])
        .token
        .as_deref(),
        Some("hf_path")
    );
    std::fs::write(dir.path().join("token"), "  \n").unwrap();
    assert_eq!(with(&[("HF_HOME", home)]).token, None);
}

#[test]
fn names_map_to_hub_repositories() {
    for m in OfficialModel::all() {
        let want = format!(
            "facebook/dinov2-{}{}",
            if m.registers { "with-registers-" } else { "" },
            m.arch.hf_word()
        );
        assert_eq!(hub_repo_id(&m.short_name()).unwrap(), want);
        assert_eq!(hub_repo_id(&want).unwrap(), want);
    }
    assert_eq!(
        hub_repo_id("dinov2_vitl14_reg4").unwrap(),
        "facebook/dinov2-with-registers-large"
    );
    assert_eq!(
        hub_repo_id("org/my.model_v2-x").unwrap(),
        "org/my.model_v2-x"
    );
    for bad in [
        "dinov2",
        "a/b/c",
        "/abs",
        "org/",
        "org/..",
        "org/a--b",
        "org/a b",
        "vit_small",
    ] {
        assert!(
            matches!(hub_repo_id(bad), Err(Error::UnknownModel { .. })),
            "{bad}"
        );
    }
}

#[test]
fn debug_output_hides_the_token() {
    let o = with(&[("HF_TOKEN", "hf_very_secret")]);
    let shown = format!("{o:?}");
    assert!(!shown.contains("hf_very_secret"), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
    assert!(!format!("{:?}", with(&[])).contains("redacted"));
}
