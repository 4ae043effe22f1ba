//! [`open_device`]: path + options -> the right engine.

use std::path::Path;
use std::sync::Arc;

use super::{BlockDevice, DeviceError, OpenOptions};

/// Opens (and optionally creates) a device file or block device.
pub fn open_device(
    _path: &Path,
    _options: &OpenOptions,
) -> Result<Arc<dyn BlockDevice>, DeviceError> {
    unimplemented!("hardware helper: step 2")
}
