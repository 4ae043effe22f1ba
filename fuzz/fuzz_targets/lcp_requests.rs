//! The local control plane's requests on the wire (JSON, as the head
//! nodes' unit port receives them): any bytes decode to a request or a
//! typed error, never a panic, and what decodes re-encodes to an equal
//! request. The state machine those requests drive is `lcp_commands`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use local_control_plane::LcpRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<LcpRequest>(data) {
        let again = serde_json::to_vec(&request).expect("a decoded request encodes");
        assert_eq!(
            serde_json::from_slice::<LcpRequest>(&again).ok(),
            Some(request)
        );
    }
});
