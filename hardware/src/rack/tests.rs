//! Rack description tests: a valid file, the example file, every error.

use super::*;

const VALID: &str = r#"
[unit]
name = "unit-1"

[[head_node]]
id = "hn-1"
address_a = "127.0.1.1:7000"
address_b = "127.0.2.1:7000"
admin = "127.0.0.1:9101"

[[sled]]
id = "sled-1"
address_a = "127.0.1.11:7100"
address_b = "127.0.2.11:7100"
admin = "127.0.0.1:9201"
[[sled.device]]
path = "/dev/null-1"
size_bytes = 1073741824
fault_domain = "fd-1"
power_domain = "pd-a"
"#;

/// `VALID` with `n` sleds sled-1..n (one device each) and overrides.
fn rack_text(sleds: usize, unit_extra: &str) -> String {
    let mut text = format!(
        "[unit]\nname = \"u\"\n{unit_extra}\n\
         [[head_node]]\nid = \"hn-1\"\naddress_a = \"127.0.1.1:7000\"\n\
         address_b = \"127.0.2.1:7000\"\nadmin = \"127.0.0.1:9101\"\n"
    );
    for s in 1..=sleds {
        text.push_str(&format!(
            "[[sled]]\nid = \"sled-{s}\"\naddress_a = \"127.0.1.{}:7100\"\n\
             address_b = \"127.0.2.{}:7100\"\nadmin = \"127.0.0.1:{}\"\n\
             [[sled.device]]\npath = \"/tmp/sled-{s}.img\"\nsize_bytes = 1073741824\n",
            10 + s,
            10 + s,
            9200 + s
        ));
    }
    text
}

#[test]
fn valid_file_parses_with_defaults() {
    let rack = Rack::from_toml_str(&rack_text(6, "")).unwrap();
    assert_eq!(rack.unit.name, "u");
    assert_eq!(rack.unit.column_size_bytes, 64 << 20);
    assert_eq!(rack.unit.erasure_codes, vec![ErasureCode { k: 4, m: 2 }]);
    assert_eq!(rack.head_node.len(), 1);
    assert_eq!(rack.sled.len(), 6);
    let sled = rack.sled("sled-3").unwrap();
    assert_eq!(sled.address_a, "127.0.1.13:7100".parse().unwrap());
    assert_eq!(sled.device[0].path, PathBuf::from("/tmp/sled-3.img"));
    assert_eq!(sled.device[0].fault_domain, None);
    assert_eq!(
        rack.head_node("hn-1").unwrap().admin,
        "127.0.0.1:9101".parse().unwrap()
    );
    assert!(rack.sled("hn-1").is_none());
    assert!(rack.head_node("sled-1").is_none());
}

#[test]
fn erasure_code_edge_cases_and_too_few_sleds() {
    let rack = Rack::from_toml_str(&VALID.replace(
        "name = \"unit-1\"",
        "name = \"unit-1\"\nerasure_codes = [\"1+0\"]",
    ));
    assert!(matches!(rack, Err(RackError::BadErasureCode { value }) if value == "1+0"));
    // A 1-sled rack is fine for a code that needs no more.
    let mut text = VALID.replace(
        "name = \"unit-1\"",
        "name = \"unit-1\"\nerasure_codes = [\"0+1\"]",
    );
    assert!(Rack::from_toml_str(&text).is_err());
    text = VALID.to_owned();
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::NotEnoughSleds {
            sleds: 1,
            needed: 6,
            ..
        })
    ));
}

/// The code is the one source of defaults: every optional setting the
/// example states (`unit.column_size_bytes`, `unit.erasure_codes`) must be
/// the value a rack file without it gets.
#[test]
fn example_file_states_only_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rack.example.toml");
    let resolve = |text: &str| Rack::from_toml_str(text).ok();
    let drift = (
        "column_size_bytes = 67108864",
        "column_size_bytes = 33554432",
    );
    assert_eq!(
        crate::config::assert_example_at_defaults(&path, &[], drift, resolve),
        vec!["unit.column_size_bytes = 33554432".to_owned()]
    );
}

#[test]
fn example_file_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rack.example.toml");
    let rack = Rack::load(&path).unwrap();
    assert_eq!(rack.unit.name, "unit-1");
    assert_eq!(rack.head_node.len(), 3);
    assert_eq!(rack.sled.len(), 6);
    for (i, sled) in rack.sled.iter().enumerate() {
        let n = i + 1;
        assert_eq!(sled.id, format!("sled-{n}"));
        assert_eq!(sled.admin.port() as usize, 9200 + n);
        assert_eq!(sled.device.len(), 2);
        for (d, device) in sled.device.iter().enumerate() {
            assert_eq!(
                device.path,
                PathBuf::from(format!("/var/lib/rackblock/sled-{n}/dev{d}.img"))
            );
            assert_eq!(device.size_bytes, 1 << 30);
            assert_eq!(
                device.fault_domain.as_deref(),
                Some(format!("fd-{n}").as_str())
            );
            let power = if n % 2 == 1 { "pd-a" } else { "pd-b" };
            assert_eq!(device.power_domain.as_deref(), Some(power));
        }
    }
    assert_eq!(
        rack.head_node("hn-3").unwrap().address_b,
        "127.0.2.3:7000".parse().unwrap()
    );
}

#[test]
fn erasure_code_parse_and_display() {
    let code: ErasureCode = "4+2".parse().unwrap();
    assert_eq!(code, ErasureCode { k: 4, m: 2 });
    assert_eq!(code.to_string(), "4+2");
    assert_eq!(code.width(), 6);
    assert_eq!(
        " 10 + 4 ".parse::<ErasureCode>().unwrap(),
        ErasureCode { k: 10, m: 4 }
    );
    for bad in [
        "4", "4+", "+2", "a+b", "4-2", "0+2", "4+0", "300+1", "200+100", "",
    ] {
        assert!(
            matches!(
                bad.parse::<ErasureCode>(),
                Err(RackError::BadErasureCode { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn parse_errors() {
    let unknown = rack_text(6, "colour = \"red\"");
    match Rack::from_toml_str(&unknown) {
        Err(RackError::Parse { message }) => assert!(message.contains("colour"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Rack::from_toml_str("not toml ["),
        Err(RackError::Parse { .. })
    ));
    let bad_address = rack_text(6, "").replace("127.0.1.1:7000", "nowhere");
    assert!(matches!(
        Rack::from_toml_str(&bad_address),
        Err(RackError::Parse { .. })
    ));
    let unknown_device_field = rack_text(6, "").replacen("size_bytes", "sizebytes", 1);
    assert!(matches!(
        Rack::from_toml_str(&unknown_device_field),
        Err(RackError::Parse { .. })
    ));
}

#[test]
fn duplicate_id() {
    let text = rack_text(6, "").replace("id = \"sled-2\"", "id = \"sled-1\"");
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::DuplicateId { id }) if id == "sled-1"
    ));
    // Head nodes and sleds share one namespace.
    let text = rack_text(6, "").replace("id = \"sled-4\"", "id = \"hn-1\"");
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::DuplicateId { id }) if id == "hn-1"
    ));
}

#[test]
fn duplicate_address() {
    let text = rack_text(6, "").replace("127.0.1.12:7100", "127.0.1.11:7100");
    match Rack::from_toml_str(&text) {
        Err(RackError::DuplicateAddress {
            address,
            first,
            second,
        }) => {
            assert_eq!(address, "127.0.1.11:7100".parse().unwrap());
            assert_eq!(first, "sled-1 address_a");
            assert_eq!(second, "sled-2 address_a");
        }
        other => panic!("{other:?}"),
    }
    let text = rack_text(6, "").replace("127.0.0.1:9203", "127.0.0.1:9101");
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::DuplicateAddress { first, second, .. })
            if first == "hn-1 admin" && second == "sled-3 admin"
    ));
}

#[test]
fn missing_network() {
    let text = rack_text(6, "").replace("address_b = \"127.0.2.14:7100\"\n", "");
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::MissingNetwork { node, network: "B" }) if node == "sled-4"
    ));
    let text = rack_text(6, "").replace("address_a = \"127.0.1.1:7000\"\n", "");
    let error = Rack::from_toml_str(&text).unwrap_err();
    assert!(matches!(&error, RackError::MissingNetwork { node, network: "A" } if node == "hn-1"));
    assert!(error.to_string().contains("hn-1"));
    let text = rack_text(6, "").replace("admin = \"127.0.0.1:9101\"\n", "");
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::MissingNetwork { node, network: "admin" }) if node == "hn-1"
    ));
}

#[test]
fn same_address_on_both_networks() {
    let text = rack_text(6, "").replace("127.0.2.15:7100", "127.0.1.15:7100");
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::SameAddressOnBothNetworks { node }) if node == "sled-5"
    ));
}

#[test]
fn no_devices() {
    let mut text = rack_text(6, "");
    text.push_str(
        "[[sled]]\nid = \"sled-7\"\naddress_a = \"127.0.1.17:7100\"\n\
         address_b = \"127.0.2.17:7100\"\nadmin = \"127.0.0.1:9207\"\n",
    );
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::NoDevices { sled }) if sled == "sled-7"
    ));
    let text = text.replace("id = \"sled-7\"", "id = \"sled-7\"\ndevice = []");
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::NoDevices { .. })
    ));
}

#[test]
fn bad_erasure_code_and_not_enough_sleds() {
    assert!(matches!(
        Rack::from_toml_str(&rack_text(6, "erasure_codes = [\"4+2\", \"four+two\"]")),
        Err(RackError::BadErasureCode { value }) if value == "four+two"
    ));
    assert!(matches!(
        Rack::from_toml_str(&rack_text(6, "erasure_codes = []")),
        Err(RackError::BadErasureCode { .. })
    ));
    match Rack::from_toml_str(&rack_text(6, "erasure_codes = [\"4+2\", \"6+3\"]")) {
        Err(RackError::NotEnoughSleds {
            sleds,
            needed,
            code,
        }) => {
            assert_eq!((sleds, needed), (6, 9));
            assert_eq!(code, ErasureCode { k: 6, m: 3 });
        }
        other => panic!("{other:?}"),
    }
    let rack = Rack::from_toml_str(&rack_text(9, "erasure_codes = [\"4+2\", \"6+3\"]")).unwrap();
    assert_eq!(rack.unit.erasure_codes.len(), 2);
    assert!(matches!(
        Rack::from_toml_str(&rack_text(5, "")),
        Err(RackError::NotEnoughSleds {
            sleds: 5,
            needed: 6,
            ..
        })
    ));
}

#[test]
fn bad_column_size() {
    for value in [4096u64, (1 << 20) - 4096, (64 << 20) + 1, 0] {
        let text = rack_text(6, &format!("column_size_bytes = {value}"));
        assert!(
            matches!(Rack::from_toml_str(&text), Err(RackError::BadColumnSize { value: v }) if v == value),
            "{value}"
        );
    }
    let rack = Rack::from_toml_str(&rack_text(6, "column_size_bytes = 1048576")).unwrap();
    assert_eq!(rack.unit.column_size_bytes, 1 << 20);
}

#[test]
fn no_head_nodes() {
    let text = rack_text(6, "");
    let start = text.find("[[head_node]]").unwrap();
    let end = text.find("[[sled]]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::NoHeadNodes)
    ));
}

#[test]
fn head_node_with_devices_is_refused() {
    let text = rack_text(6, "").replacen(
        "admin = \"127.0.0.1:9101\"\n",
        "admin = \"127.0.0.1:9101\"\n[[head_node.device]]\npath = \"/x\"\nsize_bytes = 1\n",
        1,
    );
    assert!(matches!(
        Rack::from_toml_str(&text),
        Err(RackError::Parse { message }) if message.contains("hn-1")
    ));
}

#[test]
fn load_missing_file_is_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    assert!(matches!(Rack::load(&path), Err(RackError::Io { path: p, .. }) if p == path));
}

/// A rack whose 6 sleds use files in `dir` of `actual` bytes, declared as
/// `declared` bytes, with 1 MiB columns (minimum device = 3 MiB).
fn rack_on_files(dir: &Path, declared: u64, actual: u64) -> Rack {
    let mut text = rack_text(6, "column_size_bytes = 1048576");
    for s in 1..=6 {
        let path = dir.join(format!("sled-{s}.img"));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(actual)
            .unwrap();
        text = text.replace(
            &format!("path = \"/tmp/sled-{s}.img\""),
            &format!("path = {:?}", path.display().to_string()),
        );
    }
    let text = text.replace(
        "size_bytes = 1073741824",
        &format!("size_bytes = {declared}"),
    );
    Rack::from_toml_str(&text).unwrap()
}

#[test]
fn validate_devices_ok() {
    let dir = tempfile::tempdir().unwrap();
    let rack = rack_on_files(dir.path(), 4 << 20, 8 << 20);
    assert_eq!(rack.min_device_size_bytes(), 3 << 20);
    rack.validate_devices().unwrap();
}

#[test]
fn validate_devices_missing() {
    let dir = tempfile::tempdir().unwrap();
    let rack = rack_on_files(dir.path(), 4 << 20, 4 << 20);
    let victim = dir.path().join("sled-4.img");
    std::fs::remove_file(&victim).unwrap();
    match rack.validate_devices() {
        Err(error @ RackError::DeviceMissing { .. }) => {
            assert!(error.to_string().contains("sled-4"));
            assert!(
                matches!(error, RackError::DeviceMissing { sled, path } if sled == "sled-4" && path == victim)
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn validate_devices_too_small() {
    let dir = tempfile::tempdir().unwrap();
    // Actual file smaller than declared.
    let rack = rack_on_files(dir.path(), 4 << 20, 3 << 20);
    assert!(matches!(
        rack.validate_devices(),
        Err(RackError::DeviceTooSmall { sled, size_bytes, needed_bytes, .. })
            if sled == "sled-1" && size_bytes == 3 << 20 && needed_bytes == 4 << 20
    ));
    // Declared size below reserved area + one column.
    let dir = tempfile::tempdir().unwrap();
    let rack = rack_on_files(dir.path(), 2 << 20, 8 << 20);
    assert!(matches!(
        rack.validate_devices(),
        Err(RackError::DeviceTooSmall { size_bytes, needed_bytes, .. })
            if size_bytes == 2 << 20 && needed_bytes == 3 << 20
    ));
}

#[test]
fn serializes_back_to_toml() {
    let rack = Rack::from_toml_str(&rack_text(6, "erasure_codes = [\"4+2\"]")).unwrap();
    let text = toml::to_string(&rack).unwrap();
    assert!(text.contains("erasure_codes = [\"4+2\"]"), "{text}");
    assert_eq!(Rack::from_toml_str(&text).unwrap(), rack);
}

#[test]
fn host_ports_are_optional_unique_and_for_head_nodes_only() {
    let without = Rack::from_toml_str(&rack_text(6, "")).unwrap();
    assert_eq!(without.head_node[0].host, None);
    let with = rack_text(6, "").replace(
        "admin = \"127.0.0.1:9101\"\n",
        "admin = \"127.0.0.1:9101\"\nhost = \"127.0.0.1:7000\"\n",
    );
    let rack = Rack::from_toml_str(&with).unwrap();
    assert_eq!(
        rack.head_node[0].host,
        Some("127.0.0.1:7000".parse().unwrap())
    );
    // The host port may not share an address with anything else.
    let clash = rack_text(6, "").replace(
        "admin = \"127.0.0.1:9101\"\n",
        "admin = \"127.0.0.1:9101\"\nhost = \"127.0.0.1:9201\"\n",
    );
    assert!(matches!(
        Rack::from_toml_str(&clash),
        Err(RackError::DuplicateAddress { .. })
    ));
    // Sleds have no host port: hosts never reach them.
    let sled_host = rack_text(6, "").replace(
        "admin = \"127.0.0.1:9201\"\n",
        "admin = \"127.0.0.1:9201\"\nhost = \"127.0.0.9:7000\"\n",
    );
    assert!(matches!(
        Rack::from_toml_str(&sled_host),
        Err(RackError::Parse { .. })
    ));
}
