//! The `rackblock` binary: errors, exit codes, `up`.

use std::process::Command;

use tests::{next_port, rackblock_bin};

/// Runs `rackblock ARGS`, asserts the exit code; returns stderr.
fn rackblock(args: &[&str], code: i32) -> String {
    let output = Command::new(rackblock_bin()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "rackblock {args:?}: {stderr}"
    );
    stderr
}

#[test]
fn bad_config_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sled.toml");
    std::fs::write(
        &config,
        "rack_file = \"/nonexistent/rack.toml\"\nsled_id = \"x\"\nbogus = 1\n",
    )
    .unwrap();
    let stderr = rackblock(
        &["sled-controller", "--config", config.to_str().unwrap()],
        2,
    );
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
    let stderr = rackblock(&["rack", "validate", rack.to_str().unwrap()], 2);
    assert!(stderr.contains("/nonexistent/dev0"), "{stderr}");
    rackblock(
        &["rack", "validate", "--no-devices", rack.to_str().unwrap()],
        0,
    );
}

#[test]
fn example_rack_file_is_valid() {
    let rack = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rack.example.toml");
    rackblock(&["rack", "validate", "--no-devices", rack], 0);
}

/// `rackblock up --check` starts a whole unit (6 sleds, 3 head nodes, the
/// zonal control plane), creates vol0, attaches it and waits for the NBD
/// handshake, then stops everything. A second, interactive `up` reuses the
/// data: vol0 is found, attached (the zonal plane records it), served over
/// NBD at 4 GiB (`nbdinfo`), and SIGTERM stops it all cleanly.
#[test]
fn up_starts_a_healthy_unit_and_reuses_its_data() {
    let nbdinfo = Command::new("sh")
        .args(["-c", "command -v nbdinfo"])
        .output()
        .unwrap();
    assert!(
        nbdinfo.status.success(),
        "nbdinfo is not installed: install libnbd-bin (scripts/install-deps.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = next_port();
    let admin = next_port();
    // `up` uses base+100 for sleds and admin+100+i for their admin ports;
    // reserve distinct ranges from this test's own counter. The zonal and
    // NBD ports use offsets 7 and 8, which no other instance's range hits.
    let base = (base % 100) * 10 + 30000;
    let admin = (admin % 100) * 10 + 40000;
    let zonal = format!("127.0.0.1:{}", admin + 7);
    let nbd = format!("127.0.0.1:{}", admin + 8);
    // The agent's admin port defaults to admin+200, inside another
    // instance's sled admin range: offset 9 is free like 7 and 8.
    let attach_admin = format!("127.0.0.1:{}", admin + 9);
    let up_args = |check: bool| {
        let mut args = vec![
            "up".to_string(),
            "--data-dir".into(),
            data.to_str().unwrap().into(),
            "--base-port".into(),
            base.to_string(),
            "--admin-base-port".into(),
            admin.to_string(),
            "--zonal-listen".into(),
            zonal.clone(),
            "--nbd-listen".into(),
            nbd.clone(),
            "--attach-admin".into(),
            attach_admin.clone(),
        ];
        if check {
            args.push("--check".into());
        }
        args
    };

    let output = Command::new(rackblock_bin())
        .args(up_args(true))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    for needle in [
        "sled-6",
        "created volume vol0 (4.0 GiB)",
        "vol0 is attached",
        "/metrics",
        "stopped (--check)",
    ] {
        assert!(stdout.contains(needle), "{needle}:\n{stdout}\n{stderr}");
    }
    assert!(data.join("zonal-token").exists());

    // The second run stays up until SIGTERM.
    let log = dir.path().join("up.log");
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let mut up = std::process::Command::new(rackblock_bin())
        .args(up_args(false))
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Ctrl-C stops the unit.") {
            break text;
        }
        if let Some(status) = up.try_wait().unwrap() {
            panic!("up exited ({status}):\n{text}");
        }
        if std::time::Instant::now() >= deadline {
            let _ = up.kill();
            panic!("up not ready:\n{text}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        text.contains("reusing") && text.contains("reusing volume vol0"),
        "{text}"
    );
    let info = Command::new("nbdinfo")
        .args(["--json", &format!("nbd://{nbd}/vol0")])
        .output()
        .unwrap();
    let info_text = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success(),
        "{info_text}{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info: serde_json::Value = serde_json::from_str(&info_text).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 4u64 << 30, "{info_text}");
    let token = std::fs::read_to_string(data.join("zonal-token")).unwrap();
    let describe = Command::new(rackblock_bin())
        .args(["volume", "describe", "vol0", "--output", "json"])
        .args([
            "--zonal",
            &format!("https://{zonal}"),
            "--zonal-ca",
            data.join("tls/ca.pem").to_str().unwrap(),
            "--token",
            token.trim(),
        ])
        .output()
        .unwrap();
    assert!(
        describe.status.success(),
        "{}",
        String::from_utf8_lossy(&describe.stderr)
    );
    let volume: serde_json::Value = serde_json::from_slice(&describe.stdout).unwrap();
    assert_eq!(volume["state"], "available");
    assert_eq!(
        volume["attachments"].as_array().unwrap().len(),
        1,
        "{volume}"
    );
    assert_eq!(volume["attachments"][0]["host"], "rackblock-up", "{volume}");
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = up.kill();
            panic!("up did not stop on SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");

    // No pid files left behind: every daemon was stopped.
    let leftovers: Vec<_> = std::fs::read_dir(data.join("run"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
