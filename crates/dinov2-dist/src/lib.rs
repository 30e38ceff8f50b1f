//! Collective communication for dinov2-rs: one [`Communicator`] trait, four backends.
//!
//! Everything in the workspace that crosses a rank boundary goes through [`Communicator`]: the loss crate's
//! global-batch statistics (centering, Sinkhorn-Knopp), the training loop's gradient all-reduce, and the sharded
//! curation algorithms (k-means sums, k-means++ candidates, dedup edges). Backends:
//!
//! | backend | where | how ranks are made |
//! |---|---|---|
//! | [`SingleProcess`] | default | one rank; every collective is the identity |
//! | [`ThreadGroup`] | tests, one machine | [`ThreadGroup::new`] hands out one [`ThreadRank`] per thread |
//! | `Mpi` (feature `mpi`) | CPU clusters | `mpirun -np N` / `srun`; rsmpi over the system's Open MPI or MPICH |
//! | `nccl::NcclComm` (feature `nccl`) | one process per GPU | `RANK`/`WORLD_SIZE`/`LOCAL_RANK`; CUDA buffers |
//!
//! [`from_env`] picks the backend a launcher asked for (`mpirun` sets `OMPI_COMM_WORLD_SIZE`, MPICH sets
//! `PMI_SIZE`, SLURM sets `SLURM_NTASKS`), so a binary runs unchanged alone and under `mpirun`.
//!
//! **Contract.** Every rank makes the same sequence of collective calls (same operations, same order; all-reduce
//! and broadcast buffers of the same length), as with an MPI communicator. Gathers concatenate in rank order and
//! accept different lengths per rank. Every rank receives identical bits: the in-process group adds in rank order,
//! MPI uses its library's reduction (whose result is the same on every rank). A failed peer is an error, not a
//! hang: a dropped [`ThreadRank`] fails the others' calls with [`Error::PeerLeft`], a [`ThreadGroup`] can have a
//! timeout, and under MPI a rank that stops with an error calls [`Communicator::abort`], which ends the job.
//!
//! ```
//! use dinov2_dist::{Communicator, ThreadGroup};
//! let ranks = ThreadGroup::new(2)?;
//! let sums: Vec<Vec<f64>> = std::thread::scope(|s| {
//!     let hs: Vec<_> = ranks
//!         .into_iter()
//!         .map(|r| s.spawn(move || {
//!             let mut v = vec![r.rank() as f64 + 1.0, 10.0];
//!             r.all_reduce_sum_f64(&mut v).unwrap();
//!             v
//!         }))
//!         .collect();
//!     hs.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert_eq!(sums, vec![vec![3.0, 20.0], vec![3.0, 20.0]]);
//! # Ok::<(), dinov2_dist::Error>(())
//! ```

mod error;
mod thread;

#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "nccl")]
pub mod nccl;

pub use error::{Error, Result};
#[cfg(feature = "mpi")]
pub use mpi_backend::Mpi;
pub use thread::{ThreadGroup, ThreadRank};

use std::sync::Arc;

/// Collective operations of a group of ranks (see the [crate docs](crate) for the contract).
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// The backend's name (`single`, `threads`, `mpi`, `nccl`), for logs.
    fn backend(&self) -> &'static str;

    /// Element-wise sum over ranks, written back into `buf` on every rank.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum over ranks, written back into `buf` on every rank.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;

    /// Every rank's `local` (lengths may differ) concatenated in rank order, on every rank.
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>>;
    /// Every rank's `local` (lengths may differ) concatenated in rank order, on every rank.
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>>;
    /// Every rank's `local` (lengths may differ) concatenated in rank order, on every rank.
    fn all_gather_i64(&self, local: &[i64]) -> Result<Vec<i64>>;

    /// `root`'s bytes on every rank (`buf` is resized on the others).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// `root`'s values on every rank (every rank passes a buffer of the same length).
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Ends every rank of the group after an unrecoverable error on this one, where the backend can
    /// (`MPI_Abort`); the default does nothing (in-process ranks see this one's handle dropped instead).
    fn abort(&self, code: i32) {
        let _ = code;
    }
}

/// The one-rank group: gathers return the input, sums and broadcasts are the identity.
///
/// ```
/// use dinov2_dist::{Communicator, SingleProcess};
/// let mut v = [1.5f64, 2.0];
/// SingleProcess.all_reduce_sum_f64(&mut v)?;
/// assert_eq!((SingleProcess.world_size(), v), (1, [1.5, 2.0]));
/// assert_eq!(SingleProcess.all_gather_i64(&[7, 8])?, vec![7, 8]);
/// # Ok::<(), dinov2_dist::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

fn check_root(root: usize, world: usize) -> Result<()> {
    if root < world {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            name: "root",
            reason: format!("rank {root} is not in a group of {world}"),
        })
    }
}

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        Ok(local.to_vec())
    }
    fn all_gather_i64(&self, local: &[i64]) -> Result<Vec<i64>> {
        Ok(local.to_vec())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn broadcast_f32(&self, _: &mut [f32], root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Every rank's count (`local` gathered in rank order).
///
/// ```
/// assert_eq!(dinov2_dist::gather_counts(&dinov2_dist::SingleProcess, 5)?, vec![5]);
/// # Ok::<(), dinov2_dist::Error>(())
/// ```
pub fn gather_counts(comm: &dyn Communicator, local: usize) -> Result<Vec<usize>> {
    Ok(comm
        .all_gather_i64(&[local as i64])?
        .into_iter()
        .map(|v| v as usize)
        .collect())
}

/// The contiguous range of items rank `rank` of `world` owns among `n`: near-equal parts in rank order, the first
/// `n % world` ranks one item longer.
///
/// ```
/// use dinov2_dist::shard_range;
/// assert_eq!(shard_range(10, 3, 0), 0..4);
/// assert_eq!(shard_range(10, 3, 1), 4..7);
/// assert_eq!(shard_range(10, 3, 2), 7..10);
/// ```
pub fn shard_range(n: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    let world = world.max(1);
    let (q, r) = (n / world, n % world);
    let start = rank * q + rank.min(r);
    let len = q + usize::from(rank < r);
    start.min(n)..(start + len).min(n)
}

/// The launcher that started this process, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Launcher {
    /// No launcher (or a one-rank one).
    Single,
    /// An MPI launcher (`mpirun`/`mpiexec` of Open MPI or MPICH, `srun --mpi=pmix`) with this many ranks.
    Mpi {
        /// The environment variable that gave it away.
        var: &'static str,
        /// Number of ranks.
        world: usize,
    },
    /// A torchrun-style launcher: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (the NCCL backend's convention).
    Torchrun {
        /// `RANK`.
        rank: usize,
        /// `WORLD_SIZE`.
        world: usize,
        /// `LOCAL_RANK` (the GPU of this process), `rank` when unset.
        local_rank: usize,
    },
}

fn env_usize(var: &'static str) -> Result<Option<usize>> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(v) => v.trim().parse().map(Some).map_err(|_| Error::Environment {
            reason: format!("{var}={v:?} is not a non-negative integer"),
        }),
    }
}

/// Which launcher started this process (see [`Launcher`]); MPI variables win over torchrun's.
///
/// ```
/// // a plain `cargo test` has no launcher
/// # if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_none() && std::env::var_os("PMI_SIZE").is_none()
/// #     && std::env::var_os("WORLD_SIZE").is_none() && std::env::var_os("SLURM_NTASKS").is_none() {
/// assert_eq!(dinov2_dist::launcher()?, dinov2_dist::Launcher::Single);
/// # }
/// # Ok::<(), dinov2_dist::Error>(())
/// ```
pub fn launcher() -> Result<Launcher> {
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"] {
        if let Some(world) = env_usize(var)? {
            if world > 1 {
                return Ok(Launcher::Mpi { var, world });
            }
        }
    }
    if let Some(world) = env_usize("WORLD_SIZE")? {
        let rank = env_usize("RANK")?.ok_or_else(|| Error::Environment {
            reason: "WORLD_SIZE is set but RANK is not".into(),
        })?;
        if rank >= world {
            return Err(Error::Environment {
                reason: format!("RANK={rank} is not below WORLD_SIZE={world}"),
            });
        }
        let local_rank = env_usize("LOCAL_RANK")?.unwrap_or(rank);
        if world > 1 {
            return Ok(Launcher::Torchrun {
                rank,
                world,
                local_rank,
            });
        }
    }
    Ok(Launcher::Single)
}

/// The communicator of a CPU program, from the launcher that started it: [`SingleProcess`] alone, `Mpi` under
/// an MPI launcher (an error naming the missing `mpi` feature when this build lacks it). A torchrun-style
/// environment is refused here: it needs a GPU communicator (`nccl`).
///
/// ```
/// # if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_none() && std::env::var_os("PMI_SIZE").is_none()
/// #     && std::env::var_os("WORLD_SIZE").is_none() {
/// let comm = dinov2_dist::from_env()?;
/// assert_eq!((comm.rank(), comm.world_size(), comm.backend()), (0, 1, "single"));
/// # }
/// # Ok::<(), dinov2_dist::Error>(())
/// ```
pub fn from_env() -> Result<Arc<dyn Communicator>> {
    match launcher()? {
        Launcher::Single => Ok(Arc::new(SingleProcess)),
        #[cfg(feature = "mpi")]
        Launcher::Mpi { .. } => Ok(Arc::new(Mpi::init()?)),
        #[cfg(not(feature = "mpi"))]
        Launcher::Mpi { var, world } => Err(Error::Backend {
            backend: "mpi",
            reason: format!(
                "started by an MPI launcher ({var}={world}), but this build has no MPI support: rebuild with \
                 `--features mpi` (needs the system's MPI, e.g. Debian's libopenmpi-dev, and libclang-dev)"
            ),
        }),
        Launcher::Torchrun { world, .. } => Err(Error::Backend {
            backend: "torchrun",
            reason: format!(
                "WORLD_SIZE={world} asks for a torchrun-style group, which is the GPU (NCCL) path; CPU runs \
                 on several processes are started with mpirun"
            ),
        }),
    }
}

/// A `mpirun -np <np>` command for Open MPI (or `mpiexec -n <np>` for MPICH) with the settings that let it run
/// in a container and as root: `--allow-run-as-root`, `--oversubscribe` (more ranks than cores), shared-memory
/// transport without single-copy (`btl_vader_single_copy_mechanism=none`, which containers refuse), and a session
/// directory base of its own (`orte_tmpdir_base`: `<temp dir>/dinov2-mpirun/<pid>-<n>`; empty ones of earlier
/// processes are removed):
/// two Open MPI launches starting at the same moment otherwise race to create the same session directory and
/// one fails (`mkdir /tmp/ompi.<host>.<uid>: File exists`, seen with tests launching in parallel). `None` when no
/// launcher is on `PATH`. The multi-process tests and CI start their ranks with it; append the program and its
/// arguments.
///
/// ```
/// if let Some(cmd) = dinov2_dist::mpirun_command(2) {
///     assert!(cmd.get_args().any(|a| a == "2"));
/// }
/// ```
pub fn mpirun_command(np: usize) -> Option<std::process::Command> {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    if on_path("ompi_info") && on_path("mpirun") {
        static LAUNCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = LAUNCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let parent = std::env::temp_dir().join("dinov2-mpirun");
        // Open MPI empties its session directory when a launch ends; the empty bases of earlier processes go.
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for e in entries.flatten() {
                if !e
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{pid}-"))
                {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let base = parent.join(format!("{pid}-{n}"));
        let mut c = std::process::Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
        ])
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
        if std::fs::create_dir_all(&base).is_ok() {
            c.env("OMPI_MCA_orte_tmpdir_base", &base);
        }
        Some(c)
    } else if on_path("mpiexec") {
        let mut c = std::process::Command::new("mpiexec");
        c.args(["-n", &np.to_string()]);
        Some(c)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges_tile_the_items() {
        for n in [0usize, 1, 5, 10, 97] {
            for world in 1..6 {
                let mut next = 0;
                for rank in 0..world {
                    let r = shard_range(n, world, rank);
                    assert_eq!(r.start, next);
                    assert!(r.len() + 1 >= n / world && r.len() <= n / world + 1);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn single_process_checks_the_root() {
        let mut b = vec![1u8];
        assert!(SingleProcess.broadcast_bytes(&mut b, 0).is_ok());
        let e = SingleProcess.broadcast_bytes(&mut b, 1).unwrap_err();
        assert!(
            e.to_string().contains("rank 1 is not in a group of 1"),
            "{e}"
        );
    }
}
