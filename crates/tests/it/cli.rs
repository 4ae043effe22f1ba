//! The `rackblock` binary: errors, exit codes, `up`.

use std::process::Command;

use tests::{next_port, rackblock_bin};

#[test]
fn bad_config_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sled.toml");
    std::fs::write(
        &config,
        "rack_file = \"/nonexistent/rack.toml\"\nsled_id = \"x\"\nbogus = 1\n",
    )
    .unwrap();
    let output = Command::new(rackblock_bin())
        .args(["sled-controller", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bogus"), "{stderr}");

    // A rack file naming a device that does not exist.
    let rack = dir.path().join("rack.toml");
    std::fs::write(
        &rack,
        "[unit]\nname = \"u\"\nerasure_codes = [\"1+1\"]\n[[head_node]]\nid = \"h\"\naddress_a = \"127.0.1.1:1\"\naddress_b = \"127.0.2.1:1\"\nadmin = \"127.0.0.1:2\"\n\
         [[sled]]\nid = \"s1\"\naddress_a = \"127.0.1.2:1\"\naddress_b = \"127.0.2.2:1\"\nadmin = \"127.0.0.1:3\"\n[[sled.device]]\npath = \"/nonexistent/dev0\"\nsize_bytes = 1073741824\n\
         [[sled]]\nid = \"s2\"\naddress_a = \"127.0.1.3:1\"\naddress_b = \"127.0.2.3:1\"\nadmin = \"127.0.0.1:4\"\n[[sled.device]]\npath = \"/nonexistent/dev1\"\nsize_bytes = 1073741824\n",
    )
    .unwrap();
    let output = Command::new(rackblock_bin())
        .args(["rack", "validate", rack.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/dev0"), "{stderr}");
    let output = Command::new(rackblock_bin())
        .args(["rack", "validate", "--no-devices", rack.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn example_rack_file_is_valid() {
    let rack = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/rack.example.toml"
    );
    let output = Command::new(rackblock_bin())
        .args(["rack", "validate", "--no-devices", rack])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `rackblock up --check` starts a unit of six sled controllers, waits for
/// them to be healthy, stops them; a second run reuses the data directory.
#[test]
fn up_starts_a_healthy_unit_and_reuses_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = next_port();
    let admin = next_port();
    // `up` uses base+100 for sleds and admin+100+i for their admin ports;
    // reserve distinct ranges from this test's own counter.
    let base = (base % 100) * 10 + 30000;
    let admin = (admin % 100) * 10 + 40000;
    for run in 0..2 {
        let output = Command::new(rackblock_bin())
            .args([
                "up",
                "--check",
                "--data-dir",
                data.to_str().unwrap(),
                "--device-size-mib",
                "256",
                "--base-port",
                &base.to_string(),
                "--admin-base-port",
                &admin.to_string(),
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(0),
            "run {run}\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains("sled-6"), "{stdout}");
        if run == 1 {
            assert!(stdout.contains("reusing"), "{stdout}");
        }
    }
    // No pid files left behind: every daemon was stopped.
    let leftovers: Vec<_> = std::fs::read_dir(data.join("run"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
