//! `fuzz/src/targets.rs`'s `text_files` under libFuzzer (see its documentation for what it covers).
#![no_main]
use libfuzzer_sys::fuzz_target;

dinov2_fuzz::capped_alloc!();

fuzz_target!(|data: &[u8]| {
    let _ = dinov2_fuzz::targets::text_files(data);
});
