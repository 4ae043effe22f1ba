//! Rack description; filled by the hardware helper.
