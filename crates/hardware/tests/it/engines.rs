//! One conformance suite per engine.

use std::path::Path;
use std::sync::Arc;

use hardware::{BlockDevice, EngineKind, FaultyDevice, MemoryDevice};

use crate::conformance::Factory;
use crate::conformance_suite;

fn memory(_dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>> {
    Some(Arc::new(MemoryDevice::new(size_bytes)))
}

fn fault_over_memory(_dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>> {
    Some(Arc::new(FaultyDevice::new(Arc::new(MemoryDevice::new(
        size_bytes,
    )))))
}

pub const MEMORY: Factory = Factory {
    make: memory,
    persistent: false,
    kind: EngineKind::Memory,
};

pub const FAULT: Factory = Factory {
    make: fault_over_memory,
    persistent: false,
    kind: EngineKind::Fault,
};

conformance_suite!(memory, crate::engines::MEMORY);
conformance_suite!(fault, crate::engines::FAULT);
