//! Hugging Face Hub download and cache resolution (in progress).
