//! TLS at the NBD edge (`NBD_OPT_STARTTLS`), checked with clients nobody
//! here wrote: `nbdinfo nbds://…` (libnbd, GnuTLS) and `qemu-io` with a
//! `tls-creds-x509` object. Certificates come from `rackblock tls init` (or
//! `rackblock up`) in a tempdir; every agent is stopped by pid.
//!
//! TLS on the head nodes' host port (the attach agent's link to the unit):
//! an agent with `--unit-ca` writes and reads a volume through head nodes
//! that require TLS there; a plain-TCP client is refused and counted; an
//! agent trusting another CA fails with a certificate error. `rackblock up`
//! runs its unit that way (`up_offers_tls_to_nbdinfo_and_qemu_io`).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use tests::{
    http_get, next_port, rackblock_bin, require_tool, run_tool, Daemon, HeadNodeOptions,
    RunningUnit, TestUnit, ToolOutput,
};

const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_GO: u32 = 7;
const OPT_STARTTLS: u32 = 5;
const REP_ACK: u32 = 1;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

fn tls_init(dir: &Path) {
    let out = std::process::Command::new(rackblock_bin())
        .args(["tls", "init"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// `rackblock attach m --memory 64MiB` on a fresh port with `extra` flags,
/// waited (bounded) until it greets NBD clients.
fn memory_agent(dir: &Path, extra: &[&str]) -> (Daemon, SocketAddr) {
    let listen = SocketAddr::from(([127, 0, 0, 1], next_port()));
    let listen_text = listen.to_string();
    let mut args = vec!["attach", "m", "--memory", "64MiB", "--listen", &listen_text];
    args.extend_from_slice(extra);
    let run_dir = dir.join("run");
    let daemon = Daemon::spawn_with_env(
        "attach-m",
        &args,
        dir,
        &[("RACKBLOCK_RUN_DIR", run_dir.as_os_str())],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client::nbd::server_greets(listen) {
        assert!(
            Instant::now() < deadline,
            "agent not greeting on {listen}:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (daemon, listen)
}

/// `qemu-io` over TLS (`tls-creds-x509` with the client directory);
/// panics unless every command succeeded.
fn qemu_io_tls(
    client_dir: &Path,
    listen: SocketAddr,
    export: &str,
    commands: &[&str],
) -> ToolOutput {
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        client_dir.display()
    );
    let image = format!(
        "driver=nbd,host={},port={},export={export},tls-creds=tls0",
        listen.ip(),
        listen.port()
    );
    let mut args = vec!["--object", &object, "--image-opts", &image];
    for command in commands {
        args.extend(["-c", command]);
    }
    let run = run_tool("qemu-io", &args, TOOL_TIMEOUT);
    let failed = ["Pattern verification failed", "error", "failed"]
        .into_iter()
        .find(|needle| run.stdout.contains(needle) || run.stderr.contains(needle));
    assert!(
        run.status.success() && failed.is_none(),
        "{failed:?} in {run}"
    );
    run
}

fn nbds_uri(listen: SocketAddr, export: &str, client_dir: &Path) -> String {
    format!(
        "nbds://{listen}/{export}?tls-certificates={}",
        client_dir.display()
    )
}

/// Fixed-newstyle handshake up to the options: greeting read, flags sent.
fn raw_client(listen: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(listen).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&3u32.to_be_bytes()).unwrap();
    stream
}

/// Sends `option` with `data`; returns the reply's (option, type).
fn option(stream: &mut TcpStream, option: u32, data: &[u8]) -> (u32, u32) {
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&option.to_be_bytes());
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    header.extend_from_slice(data);
    stream.write_all(&header).unwrap();
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).unwrap();
    let len = u32::from_be_bytes(reply[16..20].try_into().unwrap());
    let mut rest = vec![0u8; len as usize];
    stream.read_exact(&mut rest).unwrap();
    (
        u32::from_be_bytes(reply[8..12].try_into().unwrap()),
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
    )
}

fn go_data(export: &str) -> Vec<u8> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

/// `rackblock up` makes its CA under rackblock-data/tls (keys 0600) and
/// offers TLS on vol0: nbdinfo reads the size over `nbds://`, qemu-io
/// writes and reads back over TLS, and a plain client still reads the
/// same bytes.
#[test]
fn up_offers_tls_to_nbdinfo_and_qemu_io() {
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let mut unit = RunningUnit::start("1GiB");
    let tls = unit.data_dir.join("tls");
    for key in ["ca.key", "server.key"] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(tls.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let client_dir = tls.join("client");
    let listen = unit.ports.nbd;
    let info = run_tool(
        "nbdinfo",
        &["--json", &nbds_uri(listen, "vol0", &client_dir)],
        TOOL_TIMEOUT,
    )
    .expect_success();
    let json: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(json["TLS"], true, "{info}");
    assert_eq!(json["exports"][0]["export-size"], 1u64 << 30, "{info}");

    qemu_io_tls(
        &client_dir,
        listen,
        "vol0",
        &[
            "write -P 0x5a 1048576 1048576",
            "read -P 0x5a 1048576 1048576",
        ],
    );
    // The agent reached the head nodes over TLS: their host ports take
    // nothing else (a plain-TCP frame is closed on and counted).
    let rack = hardware::rack::Rack::load(unit.data_dir.join("rack.toml")).unwrap();
    let head = &rack.head_node[0];
    let host = head.host.unwrap();
    assert!(plain_frame_is_closed_on(host), "{host} answered plain TCP");
    let refused = wait_metric_at_least(
        head.admin,
        "rackblock_server_tls_handshake_failures_total",
        &["port=\"host\"", "reason=\"plaintext\""],
        1.0,
    );
    assert!(refused >= 1.0, "{refused}");
    // Offered, not required: the plain URI reads what went over TLS.
    let plain = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &unit.vol0_uri(),
            "-c",
            "read -P 0x5a 1048576 1048576",
        ],
        TOOL_TIMEOUT,
    );
    assert!(
        plain.status.success() && !plain.stdout.contains("failed"),
        "{plain}"
    );
    assert!(
        unit.stop(),
        "rackblock up did not stop:\n{}",
        unit.log_text()
    );
}

/// `--tls-required`: a plain client is refused with NBD_REP_ERR_TLS_REQD
/// (nbdinfo and qemu-io fail cleanly), TLS clients read and write, and a
/// client that sends garbage instead of a TLS ClientHello loses only its
/// own connection.
#[test]
fn tls_required_refuses_plain_clients_and_survives_garbage_handshakes() {
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("tls");
    tls_init(&certs);
    let client_dir = certs.join("client");
    let cert = certs.join("server.pem");
    let key = certs.join("server.key");
    let admin = SocketAddr::from(([127, 0, 0, 1], next_port()));
    let admin_text = admin.to_string();
    let (mut agent, listen) = memory_agent(
        dir.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-required",
            "--admin",
            &admin_text,
        ],
    );

    // The spec's refusal, byte for byte; ABORT is still answered.
    let mut raw = raw_client(listen);
    assert_eq!(
        option(&mut raw, OPT_GO, &go_data("m")),
        (OPT_GO, REP_ERR_TLS_REQD)
    );
    assert_eq!(option(&mut raw, 8, &[]), (8, REP_ERR_TLS_REQD));
    assert_eq!(option(&mut raw, 2, &[]), (2, REP_ACK));
    drop(raw);

    let plain = run_tool("nbdinfo", &[&format!("nbd://{listen}/m")], TOOL_TIMEOUT);
    assert!(!plain.status.success(), "plain nbdinfo was served: {plain}");
    let plain = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &format!("nbd://{listen}/m"),
            "-c",
            "read 0 4096",
        ],
        TOOL_TIMEOUT,
    );
    assert!(!plain.status.success(), "plain qemu-io was served: {plain}");

    // Garbage where the ClientHello belongs, held open while real TLS
    // clients come and go.
    let mut garbage = raw_client(listen);
    assert_eq!(
        option(&mut garbage, OPT_STARTTLS, &[]),
        (OPT_STARTTLS, REP_ACK)
    );
    garbage.write_all(&[0x42; 4096]).unwrap();
    qemu_io_tls(
        &client_dir,
        listen,
        "m",
        &["write -P 0xc3 0 65536", "read -P 0xc3 0 65536"],
    );
    let info = run_tool(
        "nbdinfo",
        &["--size", &nbds_uri(listen, "m", &client_dir)],
        TOOL_TIMEOUT,
    )
    .expect_success();
    assert_eq!(info.stdout.trim(), (64u64 << 20).to_string(), "{info}");
    // The garbage connection was closed by the agent (EOF or reset), well
    // before the handshake timeout.
    let started = Instant::now();
    let mut sink = [0u8; 4096];
    loop {
        match garbage.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(
                started.elapsed() < Duration::from_secs(15),
                "agent kept the garbage connection"
            ),
        }
    }
    // And the agent is still serving.
    qemu_io_tls(&client_dir, listen, "m", &["read -P 0xc3 0 65536"]);
    // The garbage handshake is counted.
    let Some((200, metrics)) = tests::http_get(admin, "/metrics") else {
        panic!("no metrics from the agent at {admin}");
    };
    let failed = tests::metric_sample(&metrics, "rackblock_agent_nbd_tls_handshakes_failed_total");
    assert!(failed.is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(
        agent.terminate(),
        "agent did not stop:\n{}",
        agent.log_text()
    );
}

/// The zonal API over HTTPS under `rackblock up` (issue 15 item 4):
/// `curl --cacert ca.pem https://…/v1/volumes` lists vol0, which the attach
/// agent attached over HTTPS; the CLI talks HTTPS with the CA from
/// `RACKBLOCK_ZONAL_CA`; plain HTTP gets no answer and counts as a failed
/// TLS handshake; a CA that did not sign the certificate is refused, by
/// curl and by the CLI.
#[test]
fn up_serves_the_zonal_api_over_https_to_curl_and_the_cli() {
    require_tool("curl", "curl");
    let unit = RunningUnit::start("1GiB");
    let (status, body) = unit.zonal_https_get("/v1/volumes", true);
    assert_eq!(status, 200, "{body}");
    let volumes: serde_json::Value = serde_json::from_str(&body).unwrap();
    let listed = volumes.to_string();
    assert!(listed.contains("\"vol0\""), "{listed}");
    // Without the token: the API still refuses (HTTPS is not auth).
    let (status, _) = unit.zonal_https_get("/v1/volumes", false);
    assert_eq!(status, 401);

    // The agent `up` started attached over HTTPS: its attachment is there.
    let describe = unit.cli(&["volume", "describe", "vol0", "--output", "json"]);
    assert!(
        describe.status.success(),
        "{}",
        String::from_utf8_lossy(&describe.stderr)
    );
    let volume: serde_json::Value = serde_json::from_slice(&describe.stdout).unwrap();
    assert_eq!(volume["attachments"][0]["host"], "rackblock-up", "{volume}");

    // Plain HTTP to the HTTPS port: no answer, counted.
    let plain = run_tool(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            &format!("http://{}/v1/volumes", unit.ports.zonal),
        ],
        Duration::from_secs(20),
    );
    assert!(!plain.status.success(), "plain HTTP was answered: {plain}");
    let (status, metrics) = unit.zonal_https_get("/metrics", false);
    assert_eq!(status, 200);
    let failures = tests::metric_sample(&metrics, "rackblock_zonal_tls_handshake_failures_total");
    assert!(failures.is_some_and(|n| n >= 1.0), "{metrics}");

    // curl without the CA (system roots only) refuses the certificate.
    let untrusted = run_tool(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            &format!("https://{}/health", unit.ports.zonal),
        ],
        Duration::from_secs(20),
    );
    assert!(!untrusted.status.success(), "{untrusted}");

    // The CLI: plain http:// is refused by the server, another CA by the
    // client; both fail without changing anything.
    let other = tempfile::tempdir().unwrap();
    tls_init(other.path());
    let zonal = unit.ports.zonal.to_string();
    for (url, ca) in [
        (format!("http://{zonal}"), unit.ca_cert()),
        (format!("https://{zonal}"), other.path().join("ca.pem")),
    ] {
        let out = std::process::Command::new(rackblock_bin())
            .current_dir(unit.dir.path())
            .args(["volume", "list", "--zonal", &url, "--zonal-ca"])
            .arg(&ca)
            .env("RACKBLOCK_TOKEN", &unit.token)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{url} with {} succeeded: {}",
            ca.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let listed = unit.cli(&["volume", "list", "--output", "json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("vol0"));
    let mut unit = unit;
    assert!(
        unit.stop(),
        "rackblock up did not stop:\n{}",
        unit.log_text()
    );
}

/// Sum of the samples of `metric` whose labels include all of `labels`.
fn metric_sum(admin: SocketAddr, metric: &str, labels: &[&str]) -> f64 {
    let (_, text) = http_get(admin, "/metrics").expect("metrics");
    text.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// [`metric_sum`] once it reaches `at_least`, or its value after 10 s (a
/// refusal is counted just after the connection closes).
fn wait_metric_at_least(admin: SocketAddr, metric: &str, labels: &[&str], at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = metric_sum(admin, metric, labels);
        if value >= at_least || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a valid Ping frame over plain TCP and reads until the server
/// closes (bounded by 10 s): whether it answered only with the TLS alert
/// of a TLS-only port (`proto::server::TLS_REQUIRED_ALERT`) and closed.
fn plain_frame_is_closed_on(address: SocketAddr) -> bool {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let frame = proto::Message::Ping { nonce: 7 }.to_frame(1, false);
    stream.write_all(&frame).unwrap();
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => answer == proto::server::TLS_REQUIRED_ALERT,
        // A read timeout means it kept the connection open; a reset, that
        // the alert was lost (the server drains the request to avoid it).
        Err(_) => false,
    }
}

/// Host-port TLS end to end (module docs): head nodes with
/// `host_tls_required` and a certificate for their host ports' addresses
/// from a local CA (`client::tls::issue`, what `rackblock tls issue` and
/// `up` do); an agent attached with an operator-minted attachment and
/// `--unit-ca` serves the volume, and qemu-io writes and reads it back
/// through it. A plain-TCP host-port client is refused before any frame is
/// handled and counted under `reason="plaintext"`; an agent trusting
/// another CA does not start, and says why (the certificate).
#[test]
fn host_port_tls_carries_the_agents_io_and_refuses_plain_and_foreign_clients() {
    require_tool("qemu-io", "qemu-utils");
    let unit = TestUnit::build(
        HeadNodeOptions {
            count: 2,
            ..HeadNodeOptions::default()
        },
        2,
        "1+1",
        256 << 20,
        16 << 20,
    );
    let tls_dir = unit.dir.path().join("tls");
    let files = client::tls::ensure(&tls_dir).unwrap();
    let sans: Vec<String> = unit
        .head_nodes
        .iter()
        .map(|h| h.host.ip().to_string())
        .collect();
    let issued = client::tls::issue(&tls_dir, "host", &sans, false).unwrap();
    unit.append_head_node_config(&format!(
        "host_tls_cert = \"{}\"\nhost_tls_key = \"{}\"\nhost_tls_required = true\n",
        issued.cert.display(),
        issued.key.display()
    ));
    let _sleds = unit.start_sleds();
    let heads = unit.start_head_nodes();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let lcp = unit.lcp_client();
        tests::register_volume(
            &lcp,
            local_control_plane::Command::RegisterVolume {
                volume: 3,
                name: "tlsvol".into(),
                size_bytes: 16 << 20,
                partition_size_bytes: 16 << 20,
                k: 1,
                m: 1,
            },
            Duration::from_secs(30),
        )
        .await;
        lcp.close();
    });
    unit.wait_datapaths_ready(&heads, Duration::from_secs(30));
    let rack = unit.rack_path.to_str().unwrap().to_owned();
    let ca = files.ca_cert.to_str().unwrap().to_owned();
    // Minted with the unit CA inside (`--unit-ca`), and without.
    let mint = |name: &str, extra: &[&str]| {
        let path = unit.dir.path().join(name).to_str().unwrap().to_owned();
        let mut args = vec![
            "attachment",
            "create",
            "3",
            "--rack",
            &rack,
            "--host",
            "h1",
            "--out",
            &path,
        ];
        args.extend_from_slice(extra);
        let minted = run_tool(
            rackblock_bin().to_str().unwrap(),
            &args,
            Duration::from_secs(60),
        );
        assert!(minted.status.success(), "{minted}");
        path
    };
    let attachment = mint("tlsvol.attachment", &["--unit-ca", &ca]);
    let without_ca = mint("plain.attachment", &[]);
    assert!(std::fs::read_to_string(&attachment)
        .unwrap()
        .contains("unit_ca_pem = \"-----BEGIN CERTIFICATE-----"));

    // The agent over TLS with the CA its attachment carries (no
    // --unit-ca): data written and read back through it.
    let listen = SocketAddr::from(([127, 0, 0, 1], next_port()));
    let listen_text = listen.to_string();
    let agent = Daemon::spawn(
        "attach-tlsvol",
        &[
            "attach",
            "tlsvol",
            "--rack",
            &rack,
            "--attachment-file",
            &attachment,
            "--listen",
            &listen_text,
        ],
        unit.dir.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client::nbd::server_greets(listen) {
        assert!(
            Instant::now() < deadline,
            "the agent does not serve:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let uri = format!("nbd://{listen}/tlsvol");
    let io = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x3c 0 1048576",
            "-c",
            "write -P 0xc3 9437184 65536",
            "-c",
            "read -P 0x3c 0 1048576",
            "-c",
            "read -P 0xc3 9437184 65536",
        ],
        TOOL_TIMEOUT,
    );
    assert!(
        io.status.success() && !io.stdout.contains("failed") && !io.stderr.contains("error"),
        "{io}\n{}",
        agent.log_text()
    );
    // Served on the host port, which takes TLS only.
    let served: f64 = unit
        .head_nodes
        .iter()
        .map(|h| {
            metric_sum(
                h.admin,
                "rackblock_server_requests_total",
                &["port=\"host\""],
            )
        })
        .sum();
    assert!(served >= 2.0, "{served}");
    drop(agent);

    // A plain-TCP client: closed before its frame is read, and counted.
    let head = &unit.head_nodes[0];
    assert!(
        plain_frame_is_closed_on(head.host),
        "{} answered plain TCP",
        head.host
    );
    let refused = wait_metric_at_least(
        head.admin,
        "rackblock_server_tls_handshake_failures_total",
        &["port=\"host\"", "reason=\"plaintext\""],
        1.0,
    );
    assert!(refused >= 1.0, "{refused}");

    // An agent with neither --unit-ca nor a CA in its attachment: told
    // why, not just "connection closed".
    let listen = SocketAddr::from(([127, 0, 0, 1], next_port())).to_string();
    let plain = run_tool(
        rackblock_bin().to_str().unwrap(),
        &[
            "attach",
            "tlsvol",
            "--rack",
            &rack,
            "--attachment-file",
            &without_ca,
            "--failover-timeout",
            "5s",
            "--listen",
            &listen,
        ],
        Duration::from_secs(90),
    );
    assert!(!plain.status.success(), "{plain}");
    assert!(plain.stderr.contains(proto::link::TLS_REQUIRED), "{plain}");

    // An agent trusting another CA (--unit-ca overrides the attachment's):
    // no plain-TCP fallback, a clear error.
    let other = client::tls::ensure(&unit.dir.path().join("other-ca")).unwrap();
    let listen = SocketAddr::from(([127, 0, 0, 1], next_port())).to_string();
    let foreign = run_tool(
        rackblock_bin().to_str().unwrap(),
        &[
            "attach",
            "tlsvol",
            "--rack",
            &rack,
            "--attachment-file",
            &attachment,
            "--unit-ca",
            other.ca_cert.to_str().unwrap(),
            "--failover-timeout",
            "5s",
            "--listen",
            &listen,
        ],
        Duration::from_secs(90),
    );
    assert!(!foreign.status.success(), "{foreign}");
    assert!(
        foreign.stderr.contains("certificate") && foreign.stderr.contains("TLS"),
        "{foreign}"
    );
    let failed: f64 = unit
        .head_nodes
        .iter()
        .map(|h| {
            metric_sum(
                h.admin,
                "rackblock_server_tls_handshake_failures_total",
                &["port=\"host\"", "reason=\"handshake\""],
            )
        })
        .sum();
    assert!(failed >= 1.0, "{failed}");
}
