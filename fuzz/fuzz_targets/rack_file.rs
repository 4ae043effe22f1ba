//! The rack file (TOML) as an operator or a tool might get it wrong: any
//! text must parse into a validated rack or a typed error, never a panic;
//! a rack that parses must survive its own device checks.
#![no_main]

use hardware::rack::Rack;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(rack) = Rack::from_toml_str(text) {
        let _ = rack.validate_devices();
        let _ = rack.min_device_size_bytes();
        for sled in &rack.sled {
            assert!(rack.sled(&sled.id).is_some());
        }
        for head in &rack.head_node {
            assert!(rack.head_node(&head.id).is_some());
        }
    }
});
