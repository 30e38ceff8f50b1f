//! Samplers: a sharded infinite sampler that resumes at an exact step, and an epoch sampler for evaluation.
//!
//! Both are pure functions of (seed, rank, world size, position), so a resumed run continues the exact sample order
//! (the official sampler restarts its order on resume, a TODO in its code).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// Deterministic 64-bit mixing of several values into one seed (splitmix64 steps).
///
/// ```
/// use dinov2_data::sampler::mix_seed;
/// assert_eq!(mix_seed(&[42, 0, 7]), mix_seed(&[42, 0, 7]));
/// assert_ne!(mix_seed(&[42, 0, 7]), mix_seed(&[42, 7, 0]));
/// ```
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p;
        h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// A stream of dataset indices, each with its position in the stream (positions seed the per-sample RNG).
///
/// ```
/// use dinov2_data::{EpochSampler, IndexStream};
/// let mut s = EpochSampler::new(3, 0, 1, None)?;
/// assert_eq!(s.next_index(), Some((0, 0)));
/// let mut boxed: Box<dyn IndexStream> = Box::new(s);
/// assert_eq!((boxed.next_index(), boxed.next_index(), boxed.next_index()), (Some((1, 1)), Some((2, 2)), None));
/// # Ok::<(), dinov2_data::Error>(())
/// ```
pub trait IndexStream: Send {
    /// Next `(position, dataset index)`, or `None` at the end (finite samplers).
    fn next_index(&mut self) -> Option<(u64, usize)>;
}

impl<S: IndexStream + ?Sized> IndexStream for Box<S> {
    fn next_index(&mut self) -> Option<(u64, usize)> {
        (**self).next_index()
    }
}

/// Infinite sampler sharded over `world` ranks, like the official `ShardedInfiniteSampler`: one global permutation
/// (seeded by `seed`), rank `r` takes `perm[r::world]` truncated to `n / world` items, and every pass over that slice
/// is reshuffled with a stream seeded by `(seed, rank, pass)`. Without shuffling it yields `range(n)[r::world]`
/// repeatedly.
///
/// ```
/// use dinov2_data::ShardedInfiniteSampler;
/// // 10 samples over 2 ranks: each rank sees 5 of them per pass, the two ranks disjoint
/// let r0: Vec<usize> = ShardedInfiniteSampler::new(10, 42, 0, 2, true)?.take(5).collect();
/// let r1: Vec<usize> = ShardedInfiniteSampler::new(10, 42, 1, 2, true)?.take(5).collect();
/// let mut all = [r0, r1].concat();
/// all.sort();
/// assert_eq!(all, (0..10).collect::<Vec<_>>());
/// # Ok::<(), dinov2_data::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ShardedInfiniteSampler {
    slice: Vec<usize>,
    seed: u64,
    rank: usize,
    shuffle: bool,
    pos: u64,
    pass: Option<(u64, Vec<usize>)>,
}

impl ShardedInfiniteSampler {
    /// Creates the sampler at position 0 for `n` samples, rank `rank` of `world` (example:
    /// [`ShardedInfiniteSampler`]).
    ///
    /// Errors: [`Error::InvalidRank`] unless `rank < world`, [`Error::TooFewSamples`] when `n < world`.
    ///
    /// ```
    /// use dinov2_data::{Error, ShardedInfiniteSampler};
    /// assert!(matches!(ShardedInfiniteSampler::new(10, 0, 2, 2, true), Err(Error::InvalidRank { rank: 2, world_size: 2 })));
    /// assert!(matches!(ShardedInfiniteSampler::new(3, 0, 0, 4, true), Err(Error::TooFewSamples { samples: 3, world_size: 4 })));
    /// let unshuffled: Vec<usize> = ShardedInfiniteSampler::new(10, 0, 1, 3, false)?.take(6).collect();
    /// assert_eq!(unshuffled, vec![1, 4, 7, 1, 4, 7]);
    /// # Ok::<(), dinov2_data::Error>(())
    /// ```
    pub fn new(n: usize, seed: u64, rank: usize, world: usize, shuffle: bool) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::InvalidRank {
                rank,
                world_size: world,
            });
        }
        let per = n / world;
        if per == 0 {
            return Err(Error::TooFewSamples {
                samples: n,
                world_size: world,
            });
        }
        let mut all: Vec<usize> = (0..n).collect();
        if shuffle {
            all.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[seed, 0x5eed])));
        }
        let slice: Vec<usize> = all
            .into_iter()
            .skip(rank)
            .step_by(world)
            .take(per)
            .collect();
        Ok(Self {
            slice,
            seed,
            rank,
            shuffle,
            pos: 0,
            pass: None,
        })
    }

    /// Items per pass on this rank (`n / world`; the remainder is dropped like the official sampler).
    ///
    /// ```
    /// assert_eq!(dinov2_data::ShardedInfiniteSampler::new(103, 0, 3, 4, true)?.pass_len(), 25);
    /// # Ok::<(), dinov2_data::Error>(())
    /// ```
    pub fn pass_len(&self) -> usize {
        self.slice.len()
    }

    /// Jumps to stream position `pos` in O(1) (resume at step `s` with batch size `b`: `seek(s * b)`, or the
    /// [`Loaded::next_position`](crate::Loaded::next_position) of the last batch when bad samples were skipped).
    ///
    /// ```
    /// use dinov2_data::ShardedInfiniteSampler;
    /// let s = ShardedInfiniteSampler::new(50, 3, 0, 1, true)?;
    /// let run: Vec<usize> = s.clone().take(120).collect();
    /// let mut resumed = s.clone();
    /// resumed.seek(64);
    /// assert_eq!(resumed.position(), 64);
    /// assert_eq!(resumed.take(56).collect::<Vec<_>>(), run[64..]);
    /// # Ok::<(), dinov2_data::Error>(())
    /// ```
    pub fn seek(&mut self, pos: u64) {
        self.pos = pos;
    }

    /// Current position (number of indices consumed; example: [`ShardedInfiniteSampler::seek`]).
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn order_of_pass(&self, pass: u64) -> Vec<usize> {
        let mut v = self.slice.clone();
        if self.shuffle {
            v.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[
                self.seed,
                self.rank as u64,
                pass,
            ])));
        }
        v
    }

    /// The index at stream position `pos` (a pure function of the position; `&mut` only for its per-pass cache).
    ///
    /// ```
    /// let mut s = dinov2_data::ShardedInfiniteSampler::new(20, 9, 0, 1, true)?;
    /// let at_1000 = s.clone().nth(1000).unwrap();
    /// assert_eq!(s.index_at(1000), at_1000);
    /// assert_eq!(s.position(), 0);
    /// # Ok::<(), dinov2_data::Error>(())
    /// ```
    pub fn index_at(&mut self, pos: u64) -> usize {
        let len = self.slice.len() as u64;
        let (pass, off) = (pos / len, (pos % len) as usize);
        if self.pass.as_ref().is_none_or(|(p, _)| *p != pass) {
            let o = self.order_of_pass(pass);
            self.pass = Some((pass, o));
        }
        self.pass.as_ref().map_or(0, |(_, o)| o[off])
    }
}

impl IndexStream for ShardedInfiniteSampler {
    fn next_index(&mut self) -> Option<(u64, usize)> {
        let p = self.pos;
        let i = self.index_at(p);
        self.pos += 1;
        Some((p, i))
    }
}

impl Iterator for ShardedInfiniteSampler {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        self.next_index().map(|(_, i)| i)
    }
}

/// Finite sampler for evaluation: one pass over `range(n)[rank::world]` (optionally shuffled with `seed`), nothing
/// dropped, so the ranks together see every sample exactly once.
///
/// ```
/// use dinov2_data::{EpochSampler, IndexStream};
/// let mut s = EpochSampler::new(10, 1, 3, None)?; // rank 1 of 3
/// assert_eq!((s.len(), s.is_empty()), (3, false));
/// let mut seen = Vec::new();
/// while let Some((_, i)) = s.next_index() {
///     seen.push(i);
/// }
/// assert_eq!(seen, vec![1, 4, 7]);
/// # Ok::<(), dinov2_data::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct EpochSampler {
    order: Vec<usize>,
    pos: usize,
}

impl EpochSampler {
    /// Creates the sampler for `n` samples, rank `rank` of `world`, shuffled with the seed when one is given
    /// (example: [`EpochSampler`]).
    ///
    /// Errors: [`Error::InvalidRank`] unless `rank < world`.
    pub fn new(n: usize, rank: usize, world: usize, shuffle: Option<u64>) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::InvalidRank {
                rank,
                world_size: world,
            });
        }
        let mut all: Vec<usize> = (0..n).collect();
        if let Some(seed) = shuffle {
            all.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[seed, 0xe90c])));
        }
        Ok(Self {
            order: all.into_iter().skip(rank).step_by(world).collect(),
            pos: 0,
        })
    }

    /// Number of indices of this rank (example: [`EpochSampler`]).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when this rank has nothing (example: [`EpochSampler`]).
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl IndexStream for EpochSampler {
    fn next_index(&mut self) -> Option<(u64, usize)> {
        let i = *self.order.get(self.pos)?;
        self.pos += 1;
        Some(((self.pos - 1) as u64, i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_partition_each_pass_and_passes_are_permutations() {
        let (n, world) = (103, 4);
        let mut seen = vec![0usize; n];
        for r in 0..world {
            let s = ShardedInfiniteSampler::new(n, 7, r, world, true).unwrap();
            assert_eq!(s.pass_len(), n / world);
            let pass0: Vec<usize> = s.clone().take(n / world).collect();
            let pass1: Vec<usize> = s.clone().skip(n / world).take(n / world).collect();
            let (mut a, mut b) = (pass0.clone(), pass1.clone());
            a.sort();
            b.sort();
            assert_eq!(a, b, "every pass covers the same slice");
            assert_ne!(pass0, pass1, "passes are reshuffled");
            for i in pass0 {
                seen[i] += 1;
            }
        }
        assert_eq!(
            seen.iter().filter(|&&c| c == 1).count(),
            world * (n / world)
        );
        assert!(seen.iter().all(|&c| c <= 1));
    }

    #[test]
    fn resume_at_exact_step() {
        let s = ShardedInfiniteSampler::new(50, 3, 1, 2, true).unwrap();
        let full: Vec<usize> = s.clone().take(200).collect();
        let mut r = s.clone();
        r.seek(7 * 8);
        let resumed: Vec<usize> = r.take(200 - 56).collect();
        assert_eq!(&full[56..], &resumed[..]);
    }

    #[test]
    fn unshuffled_is_strided_range_and_epoch_covers_all() {
        let s = ShardedInfiniteSampler::new(10, 0, 1, 3, false).unwrap();
        assert_eq!(s.take(6).collect::<Vec<_>>(), vec![1, 4, 7, 1, 4, 7]);
        let mut all = Vec::new();
        for r in 0..3 {
            let mut e = EpochSampler::new(10, r, 3, Some(5)).unwrap();
            while let Some((_, i)) = e.next_index() {
                all.push(i);
            }
        }
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
}
