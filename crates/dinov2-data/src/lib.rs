//! dinov2-data (work in progress).
