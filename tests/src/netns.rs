//! Network namespaces as a rack's two switches, for tests that cut a
//! network the way hardware does.
//!
//! ```text
//!   namespace <lab>-sw:   brA (network A)   brB (network B)   brM (admin)
//!                          │ │ …             │ │ …             │ │ …
//!   veth pairs:           a-<host>          b-<host>          m-<host>
//!                          │                 │                 │
//!   namespace <lab>-<host>: a0 127.0.1.x     b0 127.0.2.x      m0 127.0.3.x
//! ```
//!
//! Every daemon runs in a namespace of its own (`ip netns exec`), with one
//! interface per switch; the test's client runs in one more (a thread that
//! entered it with `setns`, see [`run_in`]). Bridges carry no address: a
//! bridge set down is a dead switch, and the hosts keep their carrier.
//! Addresses stay inside 127.0.0.0/8 (`route_localnet` on each interface of
//! each namespace): nothing here can route off the machine.
//!
//! A [`NetLab`] deletes every namespace it made when dropped (the veths and
//! bridges go with them), also when the test panics; a lab left behind by a
//! test process that was killed is swept by the next one.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

/// The switches of a [`NetLab`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// Data network A: hosts' `a0`, 127.0.1.0/24.
    A,
    /// Data network B: hosts' `b0`, 127.0.2.0/24.
    B,
    /// Admin (HTTP) network: hosts' `m0`, 127.0.3.0/24. Not a data path.
    Admin,
}

impl Switch {
    const ALL: [Switch; 3] = [Switch::A, Switch::B, Switch::Admin];

    fn letter(self) -> char {
        match self {
            Switch::A => 'a',
            Switch::B => 'b',
            Switch::Admin => 'm',
        }
    }

    pub fn bridge(self) -> &'static str {
        match self {
            Switch::A => "brA",
            Switch::B => "brB",
            Switch::Admin => "brM",
        }
    }

    /// The host's address on this switch: 127.0.{1,2,3}.`host`.
    pub fn address(self, host: u8) -> Ipv4Addr {
        let net = match self {
            Switch::A => 1,
            Switch::B => 2,
            Switch::Admin => 3,
        };
        Ipv4Addr::new(127, 0, net, host)
    }
}

/// Name prefix of every namespace a test process makes: `rbt<pid>-`.
const PREFIX: &str = "rbt";

/// Panics with a clear message unless the test runs as root with
/// iproute2 installed (CI runs as root; scripts/install-deps.sh installs
/// iproute2).
pub fn require_root_and_iproute2() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test builds network namespaces and bridges and must run as root \
         (CI does); run `sudo -E cargo test -p tests --test it ...`"
    );
    crate::require_tool("ip", "iproute2");
}

/// Runs `ip ARGS`; panics with its output unless it exits 0.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        output.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `sysctl -w` inside namespace `ns`.
fn sysctl(ns: &str, settings: &[&str]) {
    let mut args = vec!["netns", "exec", ns, "sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    ip(&args);
}

/// Namespaces named `rbt<pid>-…` whose test process is gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only probes whether the pid exists.
        if pid > 0 && unsafe { libc::kill(pid, 0) } != 0 {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One switch namespace with three bridges, and host namespaces plugged
/// into all three. Deletes them all when dropped.
#[derive(Debug)]
pub struct NetLab {
    /// `rbt<pid>-<tag>`.
    name: String,
    /// Every namespace made, the switch namespace first.
    namespaces: Vec<String>,
}

impl NetLab {
    /// Makes `<lab>-sw` with bridges brA, brB, brM, all up. `tag` (short:
    /// interface and namespace names are bounded) tells labs of one test
    /// process apart.
    pub fn new(tag: &str) -> NetLab {
        require_root_and_iproute2();
        sweep_stale();
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        let mut lab = NetLab {
            name,
            namespaces: Vec::new(),
        };
        let switch = lab.switch_namespace();
        lab.add_namespace(&switch);
        for s in Switch::ALL {
            ip(&["-n", &switch, "link", "add", s.bridge(), "type", "bridge"]);
            ip(&["-n", &switch, "link", "set", s.bridge(), "up"]);
        }
        lab
    }

    /// Makes namespace `ns` afresh (one of an earlier run of the same
    /// name is deleted first); the lab deletes it when dropped.
    fn add_namespace(&mut self, ns: &str) {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", ns]);
        self.namespaces.push(ns.to_owned());
    }

    /// Where the bridges live.
    pub fn switch_namespace(&self) -> String {
        format!("{}-sw", self.name)
    }

    /// Makes namespace `<lab>-<host>` with `lo` (127.0.0.1/32 only, so the
    /// rest of 127/8 routes to the switches) and `a0`, `b0`, `m0` at
    /// 127.0.{1,2,3}.`number`/24, each a veth into its bridge. Returns the
    /// namespace's name. `host` must be at most 11 characters.
    pub fn add_host(&mut self, host: &str, number: u8) -> String {
        assert!(host.len() <= 11, "host name {host:?} too long for a veth");
        let ns = format!("{}-{host}", self.name);
        let switch = self.switch_namespace();
        self.add_namespace(&ns);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "addr", "del", "127.0.0.1/8", "dev", "lo"]);
        ip(&["-n", &ns, "addr", "add", "127.0.0.1/32", "dev", "lo"]);
        // 127/8 on a wire is a martian unless route_localnet is on; the
        // namespace has its own sysctls. Reverse-path filtering off: the
        // three /24s are all "loopback" to it.
        sysctl(
            &ns,
            &[
                "net.ipv4.conf.all.route_localnet=1",
                "net.ipv4.conf.default.route_localnet=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        );
        for s in Switch::ALL {
            let outer = format!("{}-{host}", s.letter());
            let inner = format!("{}0", s.letter());
            ip(&[
                "-n", &switch, "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                "netns", &ns,
            ]);
            ip(&["-n", &switch, "link", "set", &outer, "master", s.bridge()]);
            ip(&["-n", &switch, "link", "set", &outer, "up"]);
            sysctl(
                &ns,
                &[
                    &format!("net.ipv4.conf.{inner}.route_localnet=1"),
                    &format!("net.ipv4.conf.{inner}.rp_filter=0"),
                ],
            );
            let address = format!("{}/24", s.address(number));
            ip(&["-n", &ns, "addr", "add", &address, "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
        }
        ns
    }

    /// Makes namespace `<lab>-<host>` with only `lo` up (all of
    /// 127.0.0.0/8 local, as on a machine's loopback) and no link to any
    /// switch: a private machine for a whole unit whose ports cannot clash
    /// with any other test's. Returns the namespace's name.
    pub fn add_isolated(&mut self, host: &str) -> String {
        let ns = format!("{}-{host}", self.name);
        self.add_namespace(&ns);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Sets a switch's bridge up or down: down is a dead switch (every
    /// port stops forwarding; hosts keep their carrier and see silence).
    pub fn set_switch(&self, switch: Switch, up: bool) {
        set_switch(&self.switch_namespace(), switch, up);
    }

    /// A command that runs `program` inside namespace `ns`
    /// (`ip netns exec`, which execs it: the child's pid is the program's).
    pub fn command(ns: &str, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// [`NetLab::set_switch`] by the switch namespace's name (for a thread
/// that does not own the lab).
pub fn set_switch(switch_namespace: &str, switch: Switch, up: bool) {
    ip(&[
        "-n",
        switch_namespace,
        "link",
        "set",
        switch.bridge(),
        if up { "up" } else { "down" },
    ]);
}

/// Moves the calling thread into namespace `ns` (`setns`: only this
/// thread, and threads it spawns from then on).
pub fn enter(ns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(Path::new("/run/netns").join(ns))?;
    // SAFETY: setns on an open namespace file; affects this thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `body` on a new thread inside namespace `ns` and returns its
/// result; a panic in `body` resumes on the caller (the test fails with
/// the original message). Sockets the body opens, and threads it starts
/// (a tokio runtime built inside), live in `ns`.
pub fn run_in<T: Send + 'static>(ns: &str, body: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_owned();
    let thread = std::thread::Builder::new()
        .name(format!("netns {ns}"))
        .spawn(move || {
            enter(&ns).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
            body()
        })
        .expect("spawn a thread");
    match thread.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
