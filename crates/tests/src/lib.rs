//! Multi-process and in-process cluster harness; see `it/`.
