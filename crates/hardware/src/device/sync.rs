//! pread/pwrite engine.
