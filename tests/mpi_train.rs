//! Data-parallel training across real processes under `mpirun -np 2` (skipped when no MPI launcher is
//! installed, unless `DINOV2_REQUIRE_MPI=1`): `cargo test --features mpi --test mpi_train`.
//!
//! * `two_mpi_ranks_of_b_equal_one_process_of_2b` re-runs itself under mpirun: each rank trains a single-process
//!   reference on the global batches (2B) and a data-parallel trainer on its half (B); their weights agree up
//!   to the order of float summation, and the ranks stay bit-identical.
//! * `mpirun_dinov2_train_writes_once_and_resumes_alone` runs `mpirun -np 2 dinov2 train` on a tiny image
//!   folder, then `dinov2 train` in one process resumes from the checkpoint the two ranks wrote.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use dinov2::train::trainer::Trainer;
use dinov2_dist::{Communicator, Mpi};
use dinov2_loss::TargetMode;

/// The tiny model, settings and batches of crates/dinov2-train/tests/data_parallel.rs.
#[path = "../crates/dinov2-train/tests/support/dp_batches.rs"]
mod dp_batches;
use dp_batches::{arch, global_batch, half, settings, state, step_batch, STEPS};

const CHILD: &str = "DINOV2_TRAIN_MPI_CHILD";

/// `mpirun -np 2`, or `None` (the test is skipped) when no launcher is installed and MPI is not required.
fn mpirun() -> Option<Command> {
    let cmd = dinov2_dist::mpirun_command(2);
    if cmd.is_none() {
        assert!(
            std::env::var("DINOV2_REQUIRE_MPI").as_deref() != Ok("1"),
            "DINOV2_REQUIRE_MPI=1 but no mpirun/mpiexec on PATH"
        );
        eprintln!("skipped: no MPI launcher on PATH");
    }
    cmd
}

fn equivalence_child() {
    let comm: Arc<dyn Communicator> = Arc::new(Mpi::init().unwrap());
    let rank = comm.rank();
    assert_eq!(comm.world_size(), 2);
    // the model of data_parallel.rs's centring case: KoLeo off, no stochastic depth, iBOT on the DINO head
    let mut reference =
        Trainer::new(arch(7, false, TargetMode::Centering), &settings(), 7).unwrap();
    let mut lr_sum = 0.0;
    for s in 0..STEPS {
        lr_sum += reference.step(&global_batch(s)).unwrap().schedule.lr;
    }
    // rank 1 starts from another initialisation: the start-up broadcast replaces it by rank 0's
    let mut dp = Trainer::new(
        arch(7 + 100 * rank as u64, false, TargetMode::Centering),
        &settings(),
        7,
    )
    .unwrap()
    .with_communicator(comm)
    .unwrap();
    for s in 0..STEPS {
        let (g, l, m) = half(rank, s);
        dp.step(&step_batch(g, l, m)).unwrap();
    }
    dp.prepare_checkpoint().unwrap(); // both ranks bit-identical (Error::RanksOutOfSync otherwise)

    // student, teacher and centres, flattened in that order (same names on both sides)
    let weights =
        |t: &mut Trainer| -> Vec<f32> { state(t).into_iter().flat_map(|(_, v)| v).collect() };
    let max = weights(&mut reference)
        .iter()
        .zip(&weights(&mut dp))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // the bound of crates/dinov2-train/tests/data_parallel.rs: 2·Σlr in theory (AdamW's update of an element
    // whose gradient is rounding noise), a few ulps of the weights in practice
    assert!(f64::from(max) <= 2.0 * lr_sum && max < 1e-5, "{max}");
    println!("mpi-train rank {rank}: ok, max |difference| {max:.3e}");
}

#[test]
fn two_mpi_ranks_of_b_equal_one_process_of_2b() {
    if std::env::var_os(CHILD).is_some() {
        return equivalence_child();
    }
    let Some(mut cmd) = mpirun() else { return };
    let out = cmd
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "two_mpi_ranks_of_b_equal_one_process_of_2b",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mpirun failed\n{stdout}\n{stderr}");
    for rank in 0..2 {
        assert!(
            stdout.contains(&format!("mpi-train rank {rank}: ok")),
            "{stdout}\n{stderr}"
        );
    }
    eprintln!(
        "{}",
        stdout
            .lines()
            .filter(|l| l.contains("mpi-train"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn write_images(dir: &Path, n: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let img = dinov2::data::image::RgbImage::from_fn(36 + i, 34, |x, y| {
            dinov2::data::image::Rgb([(x * 9 + i * 40) as u8, (y * 7) as u8, ((x * y) % 251) as u8])
        });
        img.save(dir.join(format!("{i}.jpg"))).unwrap();
    }
}

/// The tiny configuration of tests/train_cli.rs: 2 images per rank and step, 4 iterations.
const TINY: [&str; 14] = [
    "train.log_period=1",
    "student.arch=vit_tiny",
    "student.patch_size=8",
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=32",
    "dino.head_hidden_dim=16",
    "dino.head_bottleneck_dim=8",
    "train.batch_size_per_gpu=2",
    "train.OFFICIAL_EPOCH_LENGTH=2",
    "train.num_workers=1",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
];

#[test]
fn mpirun_dinov2_train_writes_once_and_resumes_alone() {
    if std::env::var_os(CHILD).is_some() {
        return; // only the parent runs it
    }
    let Some(mut cmd) = mpirun() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_images(&data, 6);
    let out = tmp.path().join("run");
    let ds = format!("train.dataset_path={}", data.display());
    let mut args = vec![
        "train",
        "--output-dir",
        out.to_str().unwrap(),
        &ds,
        "teacher.warmup_teacher_temp_epochs=1",
    ];
    args.extend(TINY);
    let o = cmd
        .arg(env!("CARGO_BIN_EXE_dinov2"))
        .args(&args)
        .args(["--stop-after-iters", "2"])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("data-parallel over 2 ranks (mpi)"),
        "{stderr}"
    );
    // rank 0 alone reports and writes
    assert_eq!(
        stdout
            .matches("stopped (--stop-after-iters) at iteration 2/4")
            .count(),
        1,
        "{stdout}"
    );
    let metrics = std::fs::read_to_string(out.join("training_metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    let kept = dinov2::train::checkpoint::list(out.join("checkpoints")).unwrap();
    assert_eq!(kept.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kept[0].1.join("trainer.json")).unwrap())
            .unwrap();
    assert_eq!(state["rank_sampler_positions"], serde_json::json!([4, 4]));

    // one process resumes the checkpoint of two and finishes
    let o = Command::new(env!("CARGO_BIN_EXE_dinov2"))
        .args(&args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("finished at iteration 4/4"), "{stdout}");
    let metrics = std::fs::read_to_string(out.join("training_metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
}

/// Time of one gradient all-reduce of a ViT-Ti-sized student (24 × 256 Ki f32 = 25 MiB) over two MPI
/// processes on this machine, for 25 MiB (default) and 4 MiB buckets (medians of 10; a measurement, not a test):
/// `cargo test --features mpi --test mpi_train -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement"]
fn gradient_all_reduce_time() {
    if std::env::var_os(CHILD).is_some() {
        let comm: Arc<dyn Communicator> = Arc::new(Mpi::init().unwrap());
        let rank = comm.rank();
        let vars: Vec<(String, candle_core::Var)> = (0..24)
            .map(|i| {
                let t = Tensor::ones(256 * 1024, DType::F32, &Device::Cpu).unwrap();
                (
                    format!("p{i:02}"),
                    candle_core::Var::from_tensor(&t).unwrap(),
                )
            })
            .collect();
        for mib in [25usize, 4] {
            let dp = dinov2::train::data_parallel::DataParallel::new(comm.clone())
                .with_bucket_bytes(mib << 20)
                .unwrap();
            let mut times = Vec::new();
            for _ in 0..10 {
                let loss = vars
                    .iter()
                    .map(|(_, v)| v.as_tensor().sum_all().unwrap())
                    .reduce(|a, b| (a + b).unwrap())
                    .unwrap();
                let mut g = loss.backward().unwrap();
                comm.barrier().unwrap();
                let t0 = std::time::Instant::now();
                let stats = dp.all_reduce_gradients(&mut g, &vars).unwrap();
                times.push((t0.elapsed().as_secs_f64(), stats.buckets));
            }
            times.sort_by(|a, b| a.0.total_cmp(&b.0));
            println!(
                "mpi-train rank {rank}: all-reduce of 25 MiB of gradients in {} buckets of {mib} MiB: median {:.1} ms",
                times[5].1,
                times[5].0 * 1e3
            );
        }
        return;
    }
    let Some(mut cmd) = mpirun() else { return };
    let out = cmd
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "gradient_all_reduce_time",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for l in stdout.lines().filter(|l| l.contains("mpi-train")) {
        eprintln!("{l}");
    }
}
