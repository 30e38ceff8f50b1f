//! MPI through rsmpi (`mpi` crate) over the system's MPI library.

use std::sync::Mutex;

use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use mpi::Count;

use crate::{check_root, Communicator, Error, Result};

/// Largest element count of one MPI call (MPI counts are C `int`s).
const CHUNK: usize = 1 << 28;

struct Inner {
    world: SimpleCommunicator,
    // Dropped last: finalizes MPI.
    _universe: Universe,
}

/// `MPI_COMM_WORLD` of a process started by `mpirun`/`mpiexec`/`srun` (feature `mpi`).
///
/// MPI is initialised with `MPI_THREAD_SERIALIZED` and every call holds a lock, so the handle can be shared
/// between threads (the loss crate keeps it in an `Arc`); only one thread talks to MPI at a time. MPI is
/// finalised when the last handle is dropped. With MPI's default error handler a failing call ends the job;
/// [`Communicator::abort`] is `MPI_Abort`, which `mpirun` turns into the end of every rank.
///
/// ```no_run
/// use dinov2_dist::{Communicator, Mpi};
/// // under `mpirun -np 2`:
/// let comm = Mpi::init()?;
/// let mut v = [comm.rank() as f64];
/// comm.all_reduce_sum_f64(&mut v)?;
/// assert_eq!(v, [1.0]);
/// # Ok::<(), dinov2_dist::Error>(())
/// ```
pub struct Mpi {
    inner: Mutex<Inner>,
    rank: usize,
    size: usize,
}

// SAFETY: MPI is initialised with (at least) MPI_THREAD_SERIALIZED, which allows MPI calls from any thread as
// long as no two run at once; every call goes through `inner`'s mutex.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.rank)
            .field("world_size", &self.size)
            .finish()
    }
}

fn backend(reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: "mpi",
        reason: reason.into(),
    }
}

impl Mpi {
    /// Initialises MPI (once per process) and returns `MPI_COMM_WORLD`.
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| {
                backend("MPI is already initialised in this process (one `Mpi` per process)")
            })?;
        if threading < mpi::Threading::Serialized {
            return Err(backend(format!(
                "the MPI library offers only {threading:?} threading; MPI_THREAD_SERIALIZED is needed"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            inner: Mutex::new(Inner {
                world,
                _universe: universe,
            }),
            rank,
            size,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gather<T: Equivalence + Default + Copy>(&self, local: &[T]) -> Result<Vec<T>> {
        let inner = self.lock();
        let w = &inner.world;
        let n = local.len() as u64;
        let mut counts = vec![0u64; self.size];
        w.all_gather_into(&n, &mut counts[..]);
        let total: u64 = counts.iter().sum();
        let total = usize::try_from(total).map_err(|_| backend("gather larger than memory"))?;
        let mut out = vec![T::default(); total];
        // Rounds of at most CHUNK / world elements per rank, so every count and displacement fits an MPI int.
        let per = (CHUNK / self.size).max(1) as u64;
        let starts: Vec<u64> = counts
            .iter()
            .scan(0u64, |acc, &c| {
                let s = *acc;
                *acc += c;
                Some(s)
            })
            .collect();
        let rounds = counts.iter().map(|&c| c.div_ceil(per)).max().unwrap_or(0);
        for round in 0..rounds {
            let off = round * per;
            let take: Vec<u64> = counts
                .iter()
                .map(|&c| c.saturating_sub(off).min(per))
                .collect();
            let mine = &local[(off.min(n)) as usize..(off + take[self.rank]).min(n) as usize];
            let round_total: u64 = take.iter().sum();
            let mut buf = vec![T::default(); round_total as usize];
            let cnt: Vec<Count> = take.iter().map(|&t| t as Count).collect();
            let displs: Vec<Count> = cnt
                .iter()
                .scan(0 as Count, |acc, &c| {
                    let d = *acc;
                    *acc += c;
                    Some(d)
                })
                .collect();
            {
                let mut part = PartitionMut::new(&mut buf[..], cnt, &displs[..]);
                w.all_gather_varcount_into(mine, &mut part);
            }
            let mut pos = 0usize;
            for (r, &t) in take.iter().enumerate() {
                let dst = (starts[r] + off) as usize;
                out[dst..dst + t as usize].copy_from_slice(&buf[pos..pos + t as usize]);
                pos += t as usize;
            }
        }
        Ok(out)
    }

    fn reduce<T: Equivalence + Default + Copy>(&self, buf: &mut [T]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        let inner = self.lock();
        let mut out = vec![T::default(); buf.len().min(CHUNK)];
        for chunk in buf.chunks_mut(CHUNK) {
            let out = &mut out[..chunk.len()];
            inner
                .world
                .all_reduce_into(&chunk[..], out, mpi::collective::SystemOperation::sum());
            chunk.copy_from_slice(out);
        }
        Ok(())
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.reduce(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce(buf)
    }
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
        self.gather(local)
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        self.gather(local)
    }
    fn all_gather_i64(&self, local: &[i64]) -> Result<Vec<i64>> {
        self.gather(local)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(root, self.size)?;
        let inner = self.lock();
        let root_proc = inner.world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        root_proc.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        for chunk in buf.chunks_mut(CHUNK) {
            root_proc.broadcast_into(chunk);
        }
        Ok(())
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        let inner = self.lock();
        let root_proc = inner.world.process_at_rank(root as i32);
        for chunk in buf.chunks_mut(CHUNK) {
            root_proc.broadcast_into(chunk);
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.lock().world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) {
        self.lock().world.abort(code)
    }
}
