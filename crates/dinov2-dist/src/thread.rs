//! Several ranks inside one process, one thread each: the test backend, and a way to split one machine.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{check_root, Communicator, Error, Result};

/// The data a rank deposits for one round.
#[derive(Clone)]
enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bytes(Vec<u8>),
    None,
}

/// What a rank asked for in a round; every rank of a round must ask for the same.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Op {
    name: &'static str,
    /// All-reduce and broadcast of typed buffers: the length every rank must pass.
    len: Option<usize>,
    root: Option<usize>,
}

struct State {
    slots: Vec<Option<(Op, Payload)>>,
    /// Ranks that have deposited in the current round.
    arrived: usize,
    /// Ranks that have read the current round's result.
    departed: usize,
    /// Bumped when a round completes (all deposited) ...
    round: u64,
    /// ... and the slots are free again once everyone has read them.
    draining: bool,
    /// Set when a rank's handle is dropped: the group can no longer complete a collective.
    left: Option<usize>,
}

struct Shared {
    world: usize,
    timeout: Option<Duration>,
    state: Mutex<State>,
    cv: Condvar,
}

/// Several ranks inside one process, one thread each.
///
/// [`ThreadGroup::new`] returns one [`ThreadRank`] per rank; move each into its own thread. When a rank's handle
/// is dropped (it returned early, say after an error, or panicked), every collective still waiting or called later
/// fails with [`Error::PeerLeft`] instead of hanging; [`ThreadGroup::with_timeout`] also bounds each wait. Calls that
/// do not match across ranks are [`Error::Mismatch`]. Sums add in rank order, so every rank gets the same bits.
///
/// ```
/// use dinov2_dist::{Communicator, ThreadGroup};
/// let out: Vec<Vec<i64>> = std::thread::scope(|s| {
///     let hs: Vec<_> = ThreadGroup::new(3)
///         .unwrap()
///         .into_iter()
///         .map(|r| s.spawn(move || r.all_gather_i64(&vec![r.rank() as i64; r.rank() + 1]).unwrap()))
///         .collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(out.iter().all(|g| g == &[0, 1, 1, 2, 2, 2]));
/// ```
pub struct ThreadGroup;

impl ThreadGroup {
    /// A group of `world >= 1` ranks without a timeout; returns their handles, rank 0 first.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Result<Vec<ThreadRank>> {
        Self::build(world, None)
    }

    /// A group whose collectives fail with [`Error::Timeout`] when the other ranks take longer than `timeout`
    /// to arrive.
    pub fn with_timeout(world: usize, timeout: Duration) -> Result<Vec<ThreadRank>> {
        Self::build(world, Some(timeout))
    }

    fn build(world: usize, timeout: Option<Duration>) -> Result<Vec<ThreadRank>> {
        if world == 0 {
            return Err(Error::InvalidArgument {
                name: "world",
                reason: "a thread group needs at least one rank".into(),
            });
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
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

/// One rank of a [`ThreadGroup`].
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
    // A panicking rank poisons the mutex; the state itself stays consistent (every update is a few plain
    // assignments), and its dropped handle has set `left`, so the others report that instead of panicking.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ThreadRank {
    fn left_error(&self, peer: usize) -> Error {
        Error::PeerLeft {
            peer,
            world: self.shared.world,
            rank: self.rank,
        }
    }

    /// Waits on the condition variable, up to the group's timeout counted from `since`.
    fn wait<'a>(
        &self,
        st: MutexGuard<'a, State>,
        since: Instant,
        op: &'static str,
    ) -> Result<MutexGuard<'a, State>> {
        match self.shared.timeout {
            None => Ok(self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner())),
            Some(t) => {
                let left = t.checked_sub(since.elapsed()).ok_or(Error::Timeout {
                    rank: self.rank,
                    op,
                    secs: t.as_secs_f64(),
                })?;
                Ok(self
                    .shared
                    .cv
                    .wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0)
            }
        }
    }

    /// Deposits `p`, waits for every rank's deposit, returns them in rank order.
    fn exchange(&self, op: Op, p: Payload) -> Result<Vec<Payload>> {
        let sh = &*self.shared;
        let since = Instant::now();
        let mut st = lock(&sh.state);
        // Wait until the previous round has been read by everyone.
        while st.draining {
            if let Some(who) = st.left {
                return Err(self.left_error(who));
            }
            st = self.wait(st, since, op.name)?;
        }
        if let Some(who) = st.left {
            return Err(self.left_error(who));
        }
        st.slots[self.rank] = Some((op, p));
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
                st = match self.wait(st, since, op.name) {
                    Ok(st) => st,
                    Err(e) => {
                        // Leave the group: the others must not wait for this rank any more.
                        let mut st = lock(&sh.state);
                        st.left.get_or_insert(self.rank);
                        sh.cv.notify_all();
                        return Err(e);
                    }
                };
            }
        }
        let out: Vec<(Op, Payload)> = st.slots.iter().flatten().cloned().collect();
        st.departed += 1;
        if st.departed == sh.world {
            st.slots.iter_mut().for_each(|s| *s = None);
            st.arrived = 0;
            st.departed = 0;
            st.draining = false;
            sh.cv.notify_all();
        }
        drop(st);
        if out.len() != sh.world || out.iter().any(|(o, _)| *o != op) {
            let ops: Vec<String> = out
                .iter()
                .map(|(o, _)| match (o.len, o.root) {
                    (Some(l), Some(r)) => format!("{}(len {l}, root {r})", o.name),
                    (Some(l), None) => format!("{}(len {l})", o.name),
                    (None, Some(r)) => format!("{}(root {r})", o.name),
                    (None, None) => o.name.to_string(),
                })
                .collect();
            return Err(Error::Mismatch {
                rank: self.rank,
                reason: format!("in the same round the ranks called {ops:?}"),
            });
        }
        Ok(out.into_iter().map(|(_, p)| p).collect())
    }
}

macro_rules! gather_impl {
    ($name:ident, $t:ty, $variant:ident) => {
        fn $name(&self, local: &[$t]) -> Result<Vec<$t>> {
            let op = Op {
                name: stringify!($name),
                len: None,
                root: None,
            };
            let mut out = Vec::new();
            for p in self.exchange(op, Payload::$variant(local.to_vec()))? {
                if let Payload::$variant(v) = p {
                    out.extend_from_slice(&v);
                }
            }
            Ok(out)
        }
    };
}

macro_rules! reduce_impl {
    ($name:ident, $t:ty, $variant:ident) => {
        fn $name(&self, buf: &mut [$t]) -> Result<()> {
            let op = Op {
                name: stringify!($name),
                len: Some(buf.len()),
                root: None,
            };
            if self.shared.world == 1 {
                return Ok(());
            }
            let parts = self.exchange(op, Payload::$variant(buf.to_vec()))?;
            // Rank order: every rank adds the same values in the same order.
            buf.fill(0.0);
            for p in parts {
                if let Payload::$variant(v) = p {
                    for (b, x) in buf.iter_mut().zip(v) {
                        *b += x;
                    }
                }
            }
            Ok(())
        }
    };
}

impl Communicator for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    reduce_impl!(all_reduce_sum_f32, f32, F32);
    reduce_impl!(all_reduce_sum_f64, f64, F64);
    gather_impl!(all_gather_f32, f32, F32);
    gather_impl!(all_gather_f64, f64, F64);
    gather_impl!(all_gather_i64, i64, I64);

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(root, self.shared.world)?;
        let op = Op {
            name: "broadcast_bytes",
            len: None,
            root: Some(root),
        };
        let mine = if self.rank == root {
            Payload::Bytes(buf.clone())
        } else {
            Payload::None
        };
        if let Payload::Bytes(v) = self.exchange(op, mine)?.swap_remove(root) {
            *buf = v;
        }
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.shared.world)?;
        let op = Op {
            name: "broadcast_f32",
            len: Some(buf.len()),
            root: Some(root),
        };
        let mine = if self.rank == root {
            Payload::F32(buf.to_vec())
        } else {
            Payload::None
        };
        if let Payload::F32(v) = self.exchange(op, mine)?.swap_remove(root) {
            buf.copy_from_slice(&v);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let op = Op {
            name: "barrier",
            len: None,
            root: None,
        };
        self.exchange(op, Payload::None).map(drop)
    }
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
    fn reductions_broadcasts_and_barriers() {
        let out = run(4, |r| {
            let mut v = vec![r.rank() as f64, 1.0];
            r.all_reduce_sum_f64(&mut v).unwrap();
            let mut w = vec![0.5f32 * r.rank() as f32];
            r.all_reduce_sum_f32(&mut w).unwrap();
            let g = r.all_gather_f32(&[r.rank() as f32]).unwrap();
            r.barrier().unwrap();
            let mut bytes = if r.rank() == 2 {
                b"id".to_vec()
            } else {
                Vec::new()
            };
            r.broadcast_bytes(&mut bytes, 2).unwrap();
            let mut f = [r.rank() as f32; 3];
            r.broadcast_f32(&mut f, 1).unwrap();
            (v, w, g, bytes, f)
        });
        for (v, w, g, bytes, f) in out {
            assert_eq!(v, vec![6.0, 4.0]);
            assert_eq!(w, vec![3.0]);
            assert_eq!(g, vec![0.0, 1.0, 2.0, 3.0]);
            assert_eq!(bytes, b"id");
            assert_eq!(f, [1.0; 3]);
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_instead_of_hanging() {
        let out = run(3, |r| {
            if r.rank() == 1 {
                return None; // drops its handle without taking part
            }
            Some(r.all_gather_f64(&[1.0]).map(|_| ()))
        });
        for (rank, res) in [0, 2].into_iter().zip(out.into_iter().flatten()) {
            match res {
                Err(e @ Error::PeerLeft { .. }) => {
                    assert!(
                        matches!(e, Error::PeerLeft { peer: 1, world: 3, rank: r } if r == rank)
                    );
                    assert!(e.to_string().contains("worker 1 of 3 left"), "{e}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_slow_rank_times_out_the_others() {
        let ranks = ThreadGroup::with_timeout(2, Duration::from_millis(50)).unwrap();
        let out: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        if r.rank() == 1 {
                            std::thread::sleep(Duration::from_millis(400));
                        }
                        r.barrier()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            matches!(
                &out[0],
                Err(Error::Timeout {
                    rank: 0,
                    op: "barrier",
                    ..
                })
            ),
            "{:?}",
            out[0]
        );
        // the late rank finds the group broken instead of waiting for a peer that gave up
        assert!(
            matches!(&out[1], Err(Error::PeerLeft { peer: 0, .. })),
            "{:?}",
            out[1]
        );
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
        let lens = run(2, |r| {
            let mut v = vec![0.0; r.rank() + 1];
            r.all_reduce_sum_f64(&mut v)
        });
        for (rank, res) in out.into_iter().chain(lens).enumerate() {
            match res {
                Err(Error::Mismatch { rank: r, reason }) => {
                    assert_eq!(r, rank % 2);
                    assert!(reason.contains("all_"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        let bad_root = run(2, |r| r.broadcast_f32(&mut [0.0], 2));
        assert!(bad_root
            .iter()
            .all(|e| matches!(e, Err(Error::InvalidArgument { .. }))));
    }
}
