//! Weight formats (in progress).
