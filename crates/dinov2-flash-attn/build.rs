//! Build script: does nothing unless the `cuda` feature is on. With it, compiles the five CUDA files in `kernels/`
//! with nvcc (in parallel, each object cached under `DINOV2_FLASH_ATTN_BUILD_DIR` by a hash of its sources, the
//! headers, the flags, the architectures and the nvcc version), archives them into a static library in OUT_DIR and
//! links it together with cudart and libstdc++.
//!
//! Environment: `CUDA_HOME`/`CUDA_PATH` (or `nvcc` on PATH), `CUDA_COMPUTE_CAP` (default 90; a comma list such as
//! `80,90` builds several; `90a` is accepted), `DINOV2_CUTLASS_DIR` (CUTLASS 3.5 headers: `include/` and
//! `tools/util/include/`), `DINOV2_FLASH_ATTN_BUILD_DIR` (object cache; default OUT_DIR), `CUDAFORGE_THREADS`
//! (parallel nvcc processes; default: all cores), `NVCC_CCBIN` (host compiler, optional). `tools/build_cuda.sh`
//! sets all of them up on a machine without a CUDA toolkit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The files nvcc compiles, heaviest first so that the parallel build finishes early.
const KERNEL_FILES: [&str; 5] = [
    "flash_bwd_hdim64_bf16_sm80.cu",
    "flash_bwd_hdim64_fp16_sm80.cu",
    "flash_fwd_hdim64_bf16_sm80.cu",
    "flash_fwd_hdim64_fp16_sm80.cu",
    "flash_api_varlen_hdim64.cu",
];

const LIB_NAME: &str = "dinov2_flash_attn_kernels";

const SETUP_HINT: &str = "on a machine without a CUDA toolkit, run the build through tools/build_cuda.sh \
     (`tools/build_cuda.sh cargo build ...`) or `eval \"$(tools/build_cuda.sh env)\"` first: it installs nvcc and \
     the CUTLASS headers from PyPI wheels and exports CUDA_HOME, CUDA_COMPUTE_CAP and DINOV2_CUTLASS_DIR";

const ENV_VARS: [&str; 7] = [
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDA_COMPUTE_CAP",
    "DINOV2_CUTLASS_DIR",
    "DINOV2_FLASH_ATTN_BUILD_DIR",
    "CUDAFORGE_THREADS",
    "NVCC_CCBIN",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(e) = build() {
        eprintln!("dinov2-flash-attn build failed: {e}");
        std::process::exit(1);
    }
}

type BuildResult<T> = Result<T, String>;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.trim().is_empty())
}

fn build() -> BuildResult<()> {
    let manifest_dir =
        PathBuf::from(env("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let kernels_dir = manifest_dir.join("kernels");
    let out_dir = PathBuf::from(env("OUT_DIR").ok_or("OUT_DIR is not set")?);
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let (nvcc, cuda_root) = find_nvcc()?;
    let nvcc_version = run_capture(Command::new(&nvcc).arg("--version"))
        .map_err(|e| format!("`{} --version` failed: {e}; {SETUP_HINT}", nvcc.display()))?;
    let archs = compute_caps()?;
    let cutlass = PathBuf::from(env("DINOV2_CUTLASS_DIR").ok_or_else(|| {
        format!("DINOV2_CUTLASS_DIR (CUTLASS 3.5 headers) is not set; {SETUP_HINT}")
    })?);
    if !cutlass.join("include/cute/tensor.hpp").is_file() {
        return Err(format!(
            "DINOV2_CUTLASS_DIR={} has no include/cute/tensor.hpp; {SETUP_HINT}",
            cutlass.display()
        ));
    }

    let mut args: Vec<String> = [
        "-std=c++17",
        "-O3",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-Xcompiler",
        "-fPIC",
        "-DFLASHATTENTION_DISABLE_DROPOUT",
        "-DFLASHATTENTION_DISABLE_ALIBI",
        "-DFLASHATTENTION_DISABLE_SOFTCAP",
        "-DFLASHATTENTION_DISABLE_LOCAL",
        "-DFLASHATTENTION_DISABLE_UNEVEN_K",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for arch in &archs {
        args.push("-gencode".into());
        args.push(format!("arch=compute_{arch},code=sm_{arch}"));
    }
    if let Some(ccbin) = env("NVCC_CCBIN") {
        args.push("-ccbin".into());
        args.push(ccbin);
    }
    for inc in [
        kernels_dir.clone(),
        cutlass.join("include"),
        cutlass.join("tools/util/include"),
    ] {
        if inc.is_dir() {
            args.push(format!("-I{}", inc.display()));
        }
    }

    // The cache key shared by all files: flags (include paths included), nvcc, the CUTLASS version and every header
    // in kernels/ (each .cu file includes most of them).
    let mut common = Fnv64::new();
    common.write_str("dinov2-flash-attn object cache v1");
    common.write_str(&nvcc_version);
    for a in &args {
        common.write_str(a);
    }
    if let Ok(v) = std::fs::read(cutlass.join("include/cutlass/version.h")) {
        common.write(&v);
    }
    let mut headers: Vec<PathBuf> = std::fs::read_dir(&kernels_dir)
        .map_err(|e| format!("reading {}: {e}", kernels_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("h" | "cuh")))
        .collect();
    headers.sort();
    for h in &headers {
        common.write_str(&h.file_name().unwrap_or_default().to_string_lossy());
        common.write(&std::fs::read(h).map_err(|e| format!("reading {}: {e}", h.display()))?);
    }

    let obj_dir = match env("DINOV2_FLASH_ATTN_BUILD_DIR") {
        Some(d) => PathBuf::from(d),
        None => out_dir.join("obj"),
    };
    std::fs::create_dir_all(&obj_dir)
        .map_err(|e| format!("creating {}: {e}", obj_dir.display()))?;

    struct Job {
        src: PathBuf,
        obj: PathBuf,
    }
    let mut jobs = Vec::new();
    for file in KERNEL_FILES {
        let src = kernels_dir.join(file);
        let content = std::fs::read(&src).map_err(|e| format!("reading {}: {e}", src.display()))?;
        let mut h = common.clone();
        h.write_str(file);
        h.write(&content);
        let stem = file.trim_end_matches(".cu");
        jobs.push(Job {
            obj: obj_dir.join(format!("{stem}-{:016x}.o", h.finish())),
            src,
        });
    }

    let threads = env("CUDAFORGE_THREADS")
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let todo: Vec<&Job> = jobs.iter().filter(|j| !j.obj.is_file()).collect();
    let arch_list = archs
        .iter()
        .map(|a| format!("sm_{a}"))
        .collect::<Vec<_>>()
        .join(",");
    // Per-file nvcc times are printed (as cargo warnings) only when something was compiled.
    if !todo.is_empty() {
        let workers = threads.min(todo.len());
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<(usize, BuildResult<Duration>)>> = Mutex::new(Vec::new());
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = todo.get(i) else { break };
                    let r = compile(&nvcc, &args, &job.src, &job.obj);
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, r));
                });
            }
        });
        let total = started.elapsed();
        let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.sort_by_key(|(i, _)| *i);
        let mut errors = Vec::new();
        for (i, r) in results {
            let name = todo[i]
                .src
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            match r {
                Ok(d) => println!(
                    "cargo:warning=dinov2-flash-attn: nvcc {name} ({arch_list}): {:.1} s",
                    d.as_secs_f64()
                ),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("\n"));
        }
        println!(
            "cargo:warning=dinov2-flash-attn: compiled {} of {} files in {:.1} s wall with {workers} parallel nvcc \
             ({} cached; objects in {})",
            todo.len(),
            jobs.len(),
            total.as_secs_f64(),
            jobs.len() - todo.len(),
            obj_dir.display()
        );
    }

    // Archive (a fresh one each time: `ar crs` would otherwise keep members of an older archive).
    let lib = out_dir.join(format!("lib{LIB_NAME}.a"));
    if lib.exists() {
        std::fs::remove_file(&lib).map_err(|e| format!("removing {}: {e}", lib.display()))?;
    }
    let ar = env("AR").unwrap_or_else(|| "ar".to_string());
    let mut cmd = Command::new(&ar);
    cmd.arg("crs").arg(&lib);
    for j in &jobs {
        cmd.arg(&j.obj);
    }
    run_capture(&mut cmd).map_err(|e| format!("`{ar} crs` failed: {e}"))?;

    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static={LIB_NAME}");
    for sub in ["lib64", "lib", "lib/x64", "targets/x86_64-linux/lib"] {
        let d = cuda_root.join(sub);
        if d.is_dir() {
            println!("cargo:rustc-link-search=native={}", d.display());
        }
    }
    println!("cargo:rustc-link-lib=dylib=cudart");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    Ok(())
}

/// nvcc and the toolkit root: `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, else `nvcc` on PATH.
fn find_nvcc() -> BuildResult<(PathBuf, PathBuf)> {
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env(var) {
            let nvcc = Path::new(&root).join("bin/nvcc");
            if nvcc.is_file() {
                return Ok((nvcc, PathBuf::from(root)));
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                let nvcc = nvcc.canonicalize().unwrap_or(nvcc);
                let root = nvcc
                    .parent()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| dir.clone());
                return Ok((nvcc, root));
            }
        }
    }
    Err(format!(
        "nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin and PATH); the `cuda` feature compiles CUDA \
         kernels; {SETUP_HINT}"
    ))
}

/// `CUDA_COMPUTE_CAP` as nvcc architecture names: "90" -> ["90"], "80,90" -> ["80", "90"], "90a" -> ["90a"].
fn compute_caps() -> BuildResult<Vec<String>> {
    let raw = env("CUDA_COMPUTE_CAP").unwrap_or_else(|| "90".to_string());
    let mut archs = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let p = part
            .trim_start_matches("sm_")
            .trim_start_matches("compute_");
        let (digits, suffix) = match p.strip_suffix('a') {
            Some(d) => (d, "a"),
            None => (p, ""),
        };
        let cap: u32 = digits.parse().map_err(|_| {
            format!("CUDA_COMPUTE_CAP={raw:?}: {part:?} is not a compute capability such as 90")
        })?;
        if cap < 80 {
            return Err(format!(
                "CUDA_COMPUTE_CAP={raw:?}: flash-attn 2 needs sm80 or newer (A100, H100, H200), got {cap}"
            ));
        }
        let arch = format!("{cap}{suffix}");
        if !archs.contains(&arch) {
            archs.push(arch);
        }
    }
    if archs.is_empty() {
        return Err(format!("CUDA_COMPUTE_CAP={raw:?} names no architecture"));
    }
    Ok(archs)
}

fn compile(nvcc: &Path, args: &[String], src: &Path, obj: &Path) -> BuildResult<Duration> {
    let tmp = obj.with_extension(format!("o.tmp{}", std::process::id()));
    let start = Instant::now();
    let out = Command::new(nvcc)
        .args(args)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&tmp)
        .output()
        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "nvcc failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Rename into place only once complete, so an interrupted build never leaves a truncated object in the cache.
    std::fs::rename(&tmp, obj).map_err(|e| format!("moving {} into place: {e}", tmp.display()))?;
    Ok(elapsed)
}

fn run_capture(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// FNV-1a, 64 bit: a hash that is stable across Rust versions (std's `DefaultHasher` is not guaranteed to be).
#[derive(Clone)]
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Length-prefixed so that consecutive fields cannot run into each other.
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_str(&mut self, s: &str) {
        self.write(s.as_bytes());
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
