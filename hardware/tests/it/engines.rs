//! One conformance suite per engine.
//!
//! The io_uring suite fails (does not skip) when io_uring cannot be set up,
//! unless `RACKBLOCK_ALLOW_NO_URING=1`.

use std::path::Path;
use std::sync::Arc;

use hardware::{
    open_device, BlockDevice, EngineChoice, EngineKind, FaultyDevice, MemoryDevice, OpenOptions,
};

use crate::conformance::Factory;
use crate::conformance_suite;

pub fn options(engine: EngineChoice, size_bytes: u64) -> OpenOptions {
    OpenOptions {
        engine,
        direct: true,
        create_size_bytes: Some(size_bytes),
        zero_fill_on_create: false,
        queue_depth: 16,
    }
}

fn uring(dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>> {
    match open_device(
        &dir.join("dev.img"),
        &options(EngineChoice::Uring, size_bytes),
    ) {
        Ok(device) => Some(device),
        Err(error) if std::env::var("RACKBLOCK_ALLOW_NO_URING").as_deref() == Ok("1") => {
            eprintln!("io_uring unavailable ({error}); skipped (RACKBLOCK_ALLOW_NO_URING=1)");
            None
        }
        Err(error) => {
            panic!("io_uring unavailable: {error} (set RACKBLOCK_ALLOW_NO_URING=1 to skip)")
        }
    }
}

fn sync(dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>> {
    Some(
        open_device(
            &dir.join("dev.img"),
            &options(EngineChoice::Sync, size_bytes),
        )
        .unwrap(),
    )
}

fn memory(_dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>> {
    Some(Arc::new(MemoryDevice::new(size_bytes)))
}

fn fault_over_memory(_dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>> {
    Some(Arc::new(FaultyDevice::new(Arc::new(MemoryDevice::new(
        size_bytes,
    )))))
}

pub const URING: Factory = Factory {
    make: uring,
    persistent: true,
    kind: EngineKind::Uring,
};

pub const SYNC: Factory = Factory {
    make: sync,
    persistent: true,
    kind: EngineKind::Sync,
};

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

conformance_suite!(uring, crate::engines::URING);
conformance_suite!(sync, crate::engines::SYNC);
conformance_suite!(memory, crate::engines::MEMORY);
conformance_suite!(fault, crate::engines::FAULT);
