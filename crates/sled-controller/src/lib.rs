//! Sled controller; filled by the sled helper.
