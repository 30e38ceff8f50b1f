//! The MPI backend across real processes: this test re-runs itself under `mpirun -np 2` (skipped when no MPI
//! launcher is installed, unless `DINOV2_REQUIRE_MPI=1`, which CI sets).
#![cfg(feature = "mpi")]

use dinov2_dist::{Communicator, Error, Mpi};

const CHILD: &str = "DINOV2_DIST_MPI_CHILD";

fn child() {
    let comm = Mpi::init().unwrap();
    let (rank, world) = (comm.rank(), comm.world_size());
    assert_eq!(world, 2);
    assert!(matches!(
        Mpi::init(),
        Err(Error::Backend { backend: "mpi", .. })
    ));

    // Sums: every rank gets the same values.
    let mut f64s: Vec<f64> = (0..1000).map(|i| (i * (rank + 1)) as f64).collect();
    comm.all_reduce_sum_f64(&mut f64s).unwrap();
    assert!(f64s.iter().enumerate().all(|(i, &v)| v == (3 * i) as f64));
    let mut f32s = vec![0.25f32 + rank as f32; 7];
    comm.all_reduce_sum_f32(&mut f32s).unwrap();
    assert_eq!(f32s, vec![1.5; 7]);
    let mut empty: [f64; 0] = [];
    comm.all_reduce_sum_f64(&mut empty).unwrap();

    // Gathers of different lengths per rank (rank 1 sends nothing in the second one).
    let mine: Vec<i64> = (0..=rank as i64 * 2)
        .map(|v| v + 10 * rank as i64)
        .collect();
    assert_eq!(comm.all_gather_i64(&mine).unwrap(), vec![0, 10, 11, 12]);
    let mine: Vec<f32> = if rank == 0 { vec![1.0, 2.0] } else { vec![] };
    assert_eq!(comm.all_gather_f32(&mine).unwrap(), vec![1.0, 2.0]);
    assert_eq!(
        comm.all_gather_f64(&[rank as f64 / 2.0]).unwrap(),
        vec![0.0, 0.5]
    );

    // Broadcasts: bytes of a length only the root knows, and typed buffers.
    let mut bytes = if rank == 1 {
        b"nccl-id".to_vec()
    } else {
        vec![9; 100]
    };
    comm.broadcast_bytes(&mut bytes, 1).unwrap();
    assert_eq!(bytes, b"nccl-id");
    let mut vals = [rank as f32 + 5.0; 4];
    comm.broadcast_f32(&mut vals, 0).unwrap();
    assert_eq!(vals, [5.0; 4]);
    assert!(matches!(
        comm.broadcast_f32(&mut vals, 2),
        Err(Error::InvalidArgument { name: "root", .. })
    ));
    comm.barrier().unwrap();
    println!("mpi-child rank {rank} of {world}: ok");
}

#[test]
fn collectives_across_two_processes() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let Some(mut cmd) = dinov2_dist::mpirun_command(2) else {
        assert!(
            std::env::var("DINOV2_REQUIRE_MPI").as_deref() != Ok("1"),
            "DINOV2_REQUIRE_MPI=1 but no mpirun/mpiexec on PATH"
        );
        eprintln!("skipped: no MPI launcher on PATH");
        return;
    };
    let out = cmd
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "collectives_across_two_processes",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mpirun failed\n{stdout}\n{stderr}");
    for rank in 0..2 {
        assert!(
            stdout.contains(&format!("mpi-child rank {rank} of 2: ok")),
            "{stdout}\n{stderr}"
        );
    }
}
