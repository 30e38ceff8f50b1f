//! Replays the fuzzers' inputs through the fuzz targets' own code (`fuzz/src/targets.rs`) in every `cargo test`:
//! * `fuzz/regressions/<target>/`: every input a fuzzer ever crashed on (a panic, an abort, an allocation driven
//!   by an unchecked length); each must now be rejected with an error;
//! * `fuzz/seeds/<target>/`: the seed corpora, built from the test fixtures; the valid ones must still parse.
//!
//! The allocator is the fuzzers' one: any single allocation above 256 MiB aborts the test.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz;

use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: fuzz::CappedAlloc = fuzz::CappedAlloc;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn every_crash_the_fuzzers_found_is_now_a_clean_error() {
    let mut replayed = 0;
    for (name, target) in fuzz::targets::TARGETS {
        for f in files(&root().join("regressions").join(name)) {
            let data = std::fs::read(&f).unwrap();
            let r = target(&data);
            assert!(
                matches!(&r, Err(e) if !e.is_empty()),
                "{}: expected a clean error, got {r:?}",
                f.display()
            );
            replayed += 1;
        }
    }
    assert!(replayed >= 4, "only {replayed} regression inputs");
    std::fs::remove_dir_all(fuzz::targets::scratch_dir()).ok();
}

#[test]
fn the_seed_corpora_replay_and_their_valid_files_still_parse() {
    for (name, target) in fuzz::targets::TARGETS {
        let seeds = files(&root().join("seeds").join(name));
        assert!(seeds.len() >= 4, "{name}: {} seeds", seeds.len());
        let ok = seeds
            .iter()
            .filter(|f| target(&std::fs::read(f).unwrap()).is_ok())
            .count();
        // Some seeds are invalid on purpose (a truncated JPEG, a tensor file that is not a model, ...).
        assert!(ok >= 1, "{name}: no seed parses");
    }
    std::fs::remove_dir_all(fuzz::targets::scratch_dir()).ok();
}
