//! dinov2-curate (work in progress).
