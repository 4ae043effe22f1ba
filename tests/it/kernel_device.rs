//! `rackblock attach --device`: the kernel block device.
//!
//! The kernel of these machines has no nbd module, so the device itself
//! is tested in a throwaway TCG VM by `scripts/vm-test.sh` (ext4 on
//! /dev/nbd0 while head nodes are killed; the agent killed and restarted
//! under a mounted file system). It runs alone, in `scripts/test.sh`'s
//! serial stage: `cargo test -p tests --test it -- --ignored --exact
//! kernel_device::ext4_on_the_kernel_device_survives_head_node_kills`.
//!
//! On the host, the typed refusals are checked.

use std::process::{Command, Stdio};
use std::time::Instant;

/// The VM test (see module docs): PASS and its figures, or the guest's
/// failure.
#[test]
#[ignore = "boots a TCG VM for one to three minutes; run alone (scripts/test.sh serial stage)"]
fn ext4_on_the_kernel_device_survives_head_node_kills() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/vm-test.sh");
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(&script)
        .env("RACKBLOCK_BIN", tests::rackblock_bin())
        .env("VM_TEST_TIMEOUT", "900")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}\n{stdout}");
    assert!(
        output.status.success(),
        "vm-test failed ({}) after {:?}",
        output.status,
        started.elapsed()
    );
    let pass = stdout
        .lines()
        .find(|line| line.starts_with("PASS vm-test"))
        .expect("a PASS line");
    assert!(pass.contains("longest guest write stall"), "{pass}");
    // Every file written across the kills was read back and matched.
    assert!(stdout.contains("VMTEST PASS checked"), "{stdout}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// On a host without the nbd module (or as a non-root user), `attach
/// --device` refuses before registering anything, with the reason.
#[test]
fn attach_device_refuses_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(tests::rackblock_bin())
            .args(args)
            .env("RACKBLOCK_RUN_DIR", dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&[
        "attach",
        "mem0",
        "--memory",
        "16MiB",
        "--device",
        "/dev/nbd0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let module = std::path::Path::new("/sys/module/nbd").exists();
    if !is_root() {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("needs root"), "{stderr}");
    } else if !module {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("the kernel has no nbd module (modprobe nbd)"),
            "{stderr}"
        );
    }
    // A device path that is not an NBD device is bad usage, on any host.
    let out = run(&[
        "attach", "mem0", "--memory", "16MiB", "--device", "/dev/sda",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected /dev/nbdN"));
    // The volume name after --device is taken for the device: said so.
    let out = run(&["attach", "--device", "mem0", "--memory", "16MiB"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Detaching a device nothing here serves: not found.
    let out = run(&["detach", "/dev/nbd7"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no attach agent serves /dev/nbd7"));
    // --force asks the kernel itself: here, the reason it cannot.
    let out = run(&["detach", "/dev/nbd7", "--force"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !is_root() {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("needs root"), "{stderr}");
    } else if !module {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("modprobe nbd"), "{stderr}");
    }
}
