//! The one interface through which every cross-worker reduction of the pipeline goes.
//!
//! A sharded run gives each worker a contiguous range of rows of one pool (rank 0 the first rows, rank 1 the next,
//! ...; see [`shard_range`]). Everything a worker cannot compute from its own rows (global row counts, k-means
//! objective and per-cluster sums, k-means++ potentials and candidate rows, dedup edges) is exchanged through a
//! [`Collective`]: [`SingleProcess`] is the one-worker case used by the plain functions of this crate;
//! [`ThreadGroup`] runs several workers inside one process (tests, and NUMA-style splitting on one machine). A
//! multi-machine backend (MPI, TCP) implements the same four methods.
//!
//! Results are deterministic for a given world size: gathers concatenate in rank order and sums add in rank order.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{invalid, Error, Result};

/// Collective operations of a group of workers.
///
/// Every worker must make the same sequence of calls (same methods, same order; all-reduce buffers of the same
/// length), as with an MPI communicator.
pub trait Collective: Send + Sync {
    /// This worker's rank in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of workers.
    fn world_size(&self) -> usize;
    /// Every worker's `local` concatenated in rank order, returned to every worker.
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>>;
    /// Every worker's `local` concatenated in rank order, returned to every worker.
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>>;
    /// Every worker's `local` concatenated in rank order, returned to every worker.
    fn all_gather_i64(&self, local: &[i64]) -> Result<Vec<i64>>;

    /// Element-wise sum over workers, added in rank order, written back into `buf` on every worker.
    ///
    /// The default gathers every buffer; backends with a native all-reduce should override it.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let world = self.world_size();
        if world == 1 {
            return Ok(());
        }
        let all = self.all_gather_f64(buf)?;
        if all.len() != buf.len() * world {
            return Err(Error::Collective {
                rank: self.rank(),
                reason: format!(
                    "all-reduce of {} values, but the workers sent {} in total",
                    buf.len(),
                    all.len()
                ),
            });
        }
        buf.copy_from_slice(&all[..buf.len()]);
        for part in all.chunks_exact(buf.len().max(1)).skip(1) {
            for (b, &v) in buf.iter_mut().zip(part) {
                *b += v;
            }
        }
        Ok(())
    }
}

/// Row counts of every worker (`local_rows` gathered in rank order).
pub fn gather_row_counts(coll: &dyn Collective, local_rows: usize) -> Result<Vec<usize>> {
    Ok(coll
        .all_gather_i64(&[local_rows as i64])?
        .into_iter()
        .map(|v| v as usize)
        .collect())
}

/// The contiguous row range worker `rank` of `world` owns in an `n`-row pool: near-equal parts, the first
/// `n % world` workers one row longer.
///
/// ```
/// use dinov2_curate::collective::shard_range;
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

/// The one-worker group: gathers return the input, sums are the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
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
}

#[derive(Clone)]
enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

impl Payload {
    fn kind(&self) -> &'static str {
        match self {
            Payload::F32(_) => "all_gather_f32",
            Payload::F64(_) => "all_gather_f64",
            Payload::I64(_) => "all_gather_i64",
        }
    }
}

struct State {
    slots: Vec<Option<Payload>>,
    /// Workers that have deposited their payload in the current round.
    arrived: usize,
    /// Workers that have read the current round's result.
    departed: usize,
    /// Bumped when a round completes (all deposited) ...
    round: u64,
    /// ... and the slots are free again once everyone has read them.
    draining: bool,
    /// Set when a worker's handle is dropped: the group can no longer complete a collective.
    left: Option<usize>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// Several workers inside one process, one thread each.
///
/// [`ThreadGroup::new`] returns one [`ThreadRank`] per worker; move each into its own thread. When a worker's
/// handle is dropped (it returned early, say after an error), every collective still waiting or called later fails
/// with [`Error::WorkerLeft`] instead of hanging.
///
/// ```
/// use dinov2_curate::collective::{Collective, ThreadGroup};
/// let ranks = ThreadGroup::new(2).unwrap();
/// let sums: Vec<Vec<f64>> = std::thread::scope(|s| {
///     let hs: Vec<_> = ranks
///         .into_iter()
///         .map(|r| {
///             s.spawn(move || {
///                 let mut v = vec![r.rank() as f64 + 1.0, 10.0];
///                 r.all_reduce_sum_f64(&mut v).unwrap();
///                 v
///             })
///         })
///         .collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert_eq!(sums, vec![vec![3.0, 20.0], vec![3.0, 20.0]]);
/// ```
pub struct ThreadGroup;

impl ThreadGroup {
    /// A group of `world >= 1` workers; returns their handles, rank 0 first.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Result<Vec<ThreadRank>> {
        if world == 0 {
            return Err(invalid("world", "a thread group needs at least one worker"));
        }
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: vec![None; world],
                arrived: 0,
                departed: 0,
                round: 0,
                draining: false,
                left: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| ThreadRank {
                shared: shared.clone(),
                rank,
            })
            .collect())
    }
}

/// One worker of a [`ThreadGroup`].
pub struct ThreadRank {
    shared: Arc<Shared>,
    rank: usize,
}

impl std::fmt::Debug for ThreadRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadRank")
            .field("rank", &self.rank)
            .field("world_size", &self.shared.world)
            .finish()
    }
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        let mut st = lock(&self.shared.state);
        st.left.get_or_insert(self.rank);
        self.shared.cv.notify_all();
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking worker poisons the mutex; the state itself stays consistent (every update is a few plain
    // assignments), and its dropped handle has set `left`, so the others report that instead of panicking.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ThreadRank {
    fn left_error(&self, who: usize) -> Error {
        Error::WorkerLeft {
            worker: who,
            world: self.shared.world,
            rank: self.rank,
        }
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner())
    }

    /// Deposits `p`, waits for every worker's payload, returns them in rank order.
    fn exchange(&self, p: Payload) -> Result<Vec<Payload>> {
        let sh = &*self.shared;
        let kind = p.kind();
        let mut st = lock(&sh.state);
        // Wait until the previous round has been read by everyone.
        while st.draining {
            if let Some(who) = st.left {
                return Err(self.left_error(who));
            }
            st = self.wait(st);
        }
        if let Some(who) = st.left {
            return Err(self.left_error(who));
        }
        st.slots[self.rank] = Some(p);
        st.arrived += 1;
        let my_round = st.round;
        if st.arrived == sh.world {
            st.round += 1;
            st.draining = true;
            sh.cv.notify_all();
        } else {
            while st.round == my_round {
                if let Some(who) = st.left {
                    return Err(self.left_error(who));
                }
                st = self.wait(st);
            }
        }
        let out: Vec<Payload> = st.slots.iter().flatten().cloned().collect();
        st.departed += 1;
        if st.departed == sh.world {
            st.slots.iter_mut().for_each(|s| *s = None);
            st.arrived = 0;
            st.departed = 0;
            st.draining = false;
            sh.cv.notify_all();
        }
        drop(st);
        if out.len() != sh.world || out.iter().any(|o| o.kind() != kind) {
            let kinds: Vec<&str> = out.iter().map(Payload::kind).collect();
            return Err(Error::Collective {
                rank: self.rank,
                reason: format!(
                    "workers made different collective calls in the same round: {kinds:?}"
                ),
            });
        }
        Ok(out)
    }
}

macro_rules! gather_impl {
    ($name:ident, $t:ty, $variant:ident) => {
        fn $name(&self, local: &[$t]) -> Result<Vec<$t>> {
            let mut out = Vec::new();
            for p in self.exchange(Payload::$variant(local.to_vec()))? {
                if let Payload::$variant(v) = p {
                    out.extend_from_slice(&v);
                }
            }
            Ok(out)
        }
    };
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    gather_impl!(all_gather_f32, f32, F32);
    gather_impl!(all_gather_f64, f64, F64);
    gather_impl!(all_gather_i64, i64, I64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send>(world: usize, f: impl Fn(ThreadRank) -> T + Sync) -> Vec<T> {
        let ranks = ThreadGroup::new(world).unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks.into_iter().map(|r| s.spawn(|| f(r))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn gathers_in_rank_order_over_many_rounds() {
        let out = run(3, |r| {
            let mut seen = Vec::new();
            for round in 0..50i64 {
                // Uneven lengths: rank r sends r + 1 values.
                let local: Vec<i64> = (0..=r.rank() as i64).map(|j| round * 100 + j).collect();
                seen.push(r.all_gather_i64(&local).unwrap());
            }
            seen
        });
        for per_rank in &out {
            for (round, g) in per_rank.iter().enumerate() {
                let r = round as i64 * 100;
                assert_eq!(g, &vec![r, r, r + 1, r, r + 1, r + 2]);
            }
        }
    }

    #[test]
    fn all_reduce_adds_in_rank_order() {
        let out = run(4, |r| {
            let mut v = vec![r.rank() as f64, 1.0];
            r.all_reduce_sum_f64(&mut v).unwrap();
            let g = r.all_gather_f32(&[r.rank() as f32]).unwrap();
            (v, g)
        });
        for (v, g) in out {
            assert_eq!(v, vec![6.0, 4.0]);
            assert_eq!(g, vec![0.0, 1.0, 2.0, 3.0]);
        }
        let mut one = vec![1.5];
        SingleProcess.all_reduce_sum_f64(&mut one).unwrap();
        assert_eq!(one, vec![1.5]);
    }

    #[test]
    fn a_worker_that_leaves_fails_the_others_instead_of_hanging() {
        let out = run(3, |r| {
            if r.rank() == 1 {
                return None; // drops its handle without taking part
            }
            Some(r.all_gather_f64(&[1.0]).map(|_| ()))
        });
        for (rank, res) in [0, 2].into_iter().zip(out.into_iter().flatten()) {
            match res {
                Err(e @ Error::WorkerLeft { .. }) => {
                    assert!(
                        matches!(e, Error::WorkerLeft { worker: 1, world: 3, rank: r } if r == rank)
                    );
                    assert!(e.to_string().contains("worker 1 of 3 left"), "{e}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn mismatched_calls_are_reported() {
        let out = run(2, |r| {
            if r.rank() == 0 {
                r.all_gather_f32(&[1.0]).map(|_| ())
            } else {
                r.all_gather_i64(&[1]).map(|_| ())
            }
        });
        for (rank, res) in out.into_iter().enumerate() {
            match res {
                Err(Error::Collective { rank: r, reason }) => {
                    assert_eq!(r, rank);
                    assert!(reason.contains("different collective calls"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn shard_ranges_tile_the_pool() {
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
}
