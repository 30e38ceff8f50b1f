//! dinov2-loss (work in progress).
