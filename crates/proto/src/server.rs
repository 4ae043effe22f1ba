//! filled by the proto helper
