//! The official schedules (`utils/utils.py: CosineScheduler`, `train/train.py: build_schedulers`).
//!
//! Values are computed on the fly from the same formula as the official numpy arrays (freeze zeros, `linspace`
//! warmup with its endpoint, half-cosine decay, `final_value` at and past `total_iters`), so a 625k-iteration
//! run needs no tables.

use std::f64::consts::PI;

use crate::error::{Error, Result};

/// `CosineScheduler(base_value, final_value, total_iters, warmup_iters, start_warmup_value, freeze_iters)`.
///
/// ```
/// use dinov2_train::schedules::CosineScheduler;
/// // 2 warmup iterations 0 → 1 (endpoint included), then a half cosine from 1 to 0 over 4 iterations
/// let s = CosineScheduler::new(1.0, 0.0, 6, 2, 0.0, 0)?;
/// let v: Vec<f64> = (0..7).map(|i| s.get(i)).collect();
/// assert_eq!(&v[..3], &[0.0, 1.0, 1.0]);
/// assert!((v[3] - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs() < 1e-15);
/// assert_eq!(v[6], 0.0); // at and past total_iters: the final value
/// # Ok::<(), dinov2_train::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CosineScheduler {
    base_value: f64,
    final_value: f64,
    total_iters: u64,
    warmup_iters: u64,
    start_warmup_value: f64,
    freeze_iters: u64,
}

impl CosineScheduler {
    /// The schedule; `warmup_iters + freeze_iters` may not exceed `total_iters` (the official assertion).
    pub fn new(
        base_value: f64,
        final_value: f64,
        total_iters: u64,
        warmup_iters: u64,
        start_warmup_value: f64,
        freeze_iters: u64,
    ) -> Result<Self> {
        if warmup_iters + freeze_iters > total_iters {
            return Err(Error::InvalidArgument {
                name: "warmup_iters",
                reason: format!(
                    "warmup ({warmup_iters}) + freeze ({freeze_iters}) iterations exceed the {total_iters} \
                     iterations of the schedule"
                ),
            });
        }
        Ok(Self {
            base_value,
            final_value,
            total_iters,
            warmup_iters,
            start_warmup_value,
            freeze_iters,
        })
    }

    /// The value at iteration `it` (the official `schedule[it]`, or `final_value` when `it >= total_iters`).
    pub fn get(&self, it: u64) -> f64 {
        if it >= self.total_iters {
            return self.final_value;
        }
        if it < self.freeze_iters {
            return 0.0;
        }
        let i = it - self.freeze_iters;
        if i < self.warmup_iters {
            // numpy.linspace(start, base, warmup): start + i·step, the last element exactly `base`
            let n = self.warmup_iters;
            if n > 1 && i == n - 1 {
                return self.base_value;
            }
            let step = if n > 1 {
                (self.base_value - self.start_warmup_value) / (n - 1) as f64
            } else {
                0.0
            };
            return i as f64 * step + self.start_warmup_value;
        }
        let i = (i - self.warmup_iters) as f64;
        let len = (self.total_iters - self.warmup_iters - self.freeze_iters) as f64;
        self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + (PI * i / len).cos())
    }

    /// `total_iters`.
    pub fn total_iters(&self) -> u64 {
        self.total_iters
    }
}

/// The five schedules of one run (`build_schedulers`): learning rate, weight decay, teacher momentum, teacher
/// temperature, and the last layer's learning rate (the learning rate, zero for the first
/// `freeze_last_layer_epochs` epochs).
///
/// ```
/// use dinov2_train::schedules::{ScheduleConfig, Schedules};
/// let cfg = ScheduleConfig { lr: 1e-3, epochs: 4, epoch_length: 10, warmup_epochs: 1, ..ScheduleConfig::official() };
/// let s = Schedules::new(&cfg)?;
/// let v = s.at(0);
/// assert_eq!((v.lr, v.last_layer_lr, v.teacher_temp), (0.0, 0.0, 0.04));
/// assert!((v.weight_decay - 0.04).abs() < 1e-16 && (v.momentum - 0.992).abs() < 1e-16);
/// assert_eq!(s.at(40).lr, 1e-6); // past the end: min_lr
/// # Ok::<(), dinov2_train::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Schedules {
    lr: CosineScheduler,
    weight_decay: CosineScheduler,
    momentum: CosineScheduler,
    teacher_temp: CosineScheduler,
    freeze_last_layer_iters: u64,
}

/// The inputs of [`Schedules::new`] (the config keys, in iterations where the official code multiplies by
/// `OFFICIAL_EPOCH_LENGTH`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    /// The scaled peak learning rate (`optim.lr` after the scaling rule).
    pub lr: f64,
    /// `optim.min_lr`.
    pub min_lr: f64,
    /// `optim.epochs`.
    pub epochs: u64,
    /// `train.OFFICIAL_EPOCH_LENGTH`.
    pub epoch_length: u64,
    /// `optim.warmup_epochs`.
    pub warmup_epochs: u64,
    /// `optim.freeze_last_layer_epochs`.
    pub freeze_last_layer_epochs: u64,
    /// `optim.weight_decay`.
    pub weight_decay: f64,
    /// `optim.weight_decay_end`.
    pub weight_decay_end: f64,
    /// `teacher.momentum_teacher`.
    pub momentum_teacher: f64,
    /// `teacher.final_momentum_teacher`.
    pub final_momentum_teacher: f64,
    /// `teacher.warmup_teacher_temp`.
    pub warmup_teacher_temp: f64,
    /// `teacher.teacher_temp`.
    pub teacher_temp: f64,
    /// `teacher.warmup_teacher_temp_epochs`.
    pub warmup_teacher_temp_epochs: u64,
}

impl ScheduleConfig {
    /// The official defaults (`ssl_default_config.yaml`) with `lr` 0 (set it from the scaling rule).
    pub fn official() -> Self {
        Self {
            lr: 0.0,
            min_lr: 1e-6,
            epochs: 100,
            epoch_length: 1250,
            warmup_epochs: 10,
            freeze_last_layer_epochs: 1,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.992,
            final_momentum_teacher: 1.0,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.07,
            warmup_teacher_temp_epochs: 30,
        }
    }
}

/// The values of every schedule at one iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleValues {
    /// Learning rate (before the per-group multipliers).
    pub lr: f64,
    /// Weight decay (before the per-group multipliers).
    pub weight_decay: f64,
    /// Teacher EMA momentum.
    pub momentum: f64,
    /// Teacher temperature.
    pub teacher_temp: f64,
    /// Learning rate of the heads' `last_layer` parameters.
    pub last_layer_lr: f64,
}

impl Schedules {
    /// The official schedules for `cfg` (errors when a warmup is longer than its schedule).
    pub fn new(cfg: &ScheduleConfig) -> Result<Self> {
        let total = cfg.epochs * cfg.epoch_length;
        let tt_iters = cfg.warmup_teacher_temp_epochs * cfg.epoch_length;
        Ok(Self {
            lr: CosineScheduler::new(
                cfg.lr,
                cfg.min_lr,
                total,
                cfg.warmup_epochs * cfg.epoch_length,
                0.0,
                0,
            )?,
            weight_decay: CosineScheduler::new(
                cfg.weight_decay,
                cfg.weight_decay_end,
                total,
                0,
                0.0,
                0,
            )?,
            momentum: CosineScheduler::new(
                cfg.momentum_teacher,
                cfg.final_momentum_teacher,
                total,
                0,
                0.0,
                0,
            )?,
            teacher_temp: CosineScheduler::new(
                cfg.teacher_temp,
                cfg.teacher_temp,
                tt_iters,
                tt_iters,
                cfg.warmup_teacher_temp,
                0,
            )?,
            freeze_last_layer_iters: cfg.freeze_last_layer_epochs * cfg.epoch_length,
        })
    }

    /// Every value at iteration `it`.
    pub fn at(&self, it: u64) -> ScheduleValues {
        let lr = self.lr.get(it);
        // `last_layer_lr_schedule.schedule[:freeze] = 0`: only entries inside the array are zeroed
        let frozen = it < self.freeze_last_layer_iters && it < self.lr.total_iters();
        ScheduleValues {
            lr,
            weight_decay: self.weight_decay.get(it),
            momentum: self.momentum.get(it),
            teacher_temp: self.teacher_temp.get(it),
            last_layer_lr: if frozen { 0.0 } else { lr },
        }
    }

    /// The number of iterations of the run (`epochs × OFFICIAL_EPOCH_LENGTH`).
    pub fn max_iter(&self) -> u64 {
        self.lr.total_iters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_temp_is_linear_then_constant() {
        let cfg = ScheduleConfig {
            epoch_length: 5,
            warmup_teacher_temp_epochs: 2,
            lr: 1.0,
            ..ScheduleConfig::official()
        };
        let s = Schedules::new(&cfg).unwrap();
        // linspace(0.04, 0.07, 10)
        for i in 0..10u64 {
            let want = if i == 9 {
                0.07
            } else {
                i as f64 * ((0.07 - 0.04) / 9.0) + 0.04
            };
            assert_eq!(s.at(i).teacher_temp, want, "iteration {i}");
        }
        assert_eq!(s.at(10).teacher_temp, 0.07);
        assert_eq!(s.at(1_000_000).teacher_temp, 0.07);
    }

    #[test]
    fn lr_warmup_cosine_and_last_layer_freeze() {
        let cfg = ScheduleConfig {
            lr: 2.0,
            min_lr: 0.5,
            epochs: 3,
            epoch_length: 4,
            warmup_epochs: 1,
            freeze_last_layer_epochs: 2,
            ..ScheduleConfig::official()
        };
        let s = Schedules::new(&cfg).unwrap();
        assert_eq!(s.max_iter(), 12);
        let lr: Vec<f64> = (0..12).map(|i| s.at(i).lr).collect();
        assert_eq!(&lr[..4], &[0.0, 2.0 / 3.0, 4.0 / 3.0, 2.0]);
        assert_eq!(lr[4], 2.0); // cosine starts at its base value
        for (j, v) in lr[4..].iter().enumerate() {
            let want = 0.5 + 0.5 * 1.5 * (1.0 + (PI * j as f64 / 8.0).cos());
            assert!((v - want).abs() < 1e-15);
        }
        assert!(lr.windows(2).skip(3).all(|w| w[1] <= w[0]));
        let last: Vec<f64> = (0..12).map(|i| s.at(i).last_layer_lr).collect();
        assert!(last[..8].iter().all(|&v| v == 0.0));
        assert_eq!(&last[8..], &lr[8..]);
        // weight decay and momentum: cosine without warmup, final value at the end
        assert!((s.at(0).weight_decay - 0.04).abs() < 1e-16);
        assert_eq!(s.at(12).weight_decay, 0.4);
        assert_eq!(s.at(12).momentum, 1.0);
    }

    #[test]
    fn warmup_longer_than_the_run_is_an_error() {
        let cfg = ScheduleConfig {
            epochs: 1,
            warmup_epochs: 2,
            ..ScheduleConfig::official()
        };
        assert!(matches!(
            Schedules::new(&cfg),
            Err(Error::InvalidArgument {
                name: "warmup_iters",
                ..
            })
        ));
    }
}
