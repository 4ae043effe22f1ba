//! An in-process zonal control plane on 127.0.0.1:0 and a minimal HTTP/1.1
//! client over a tokio TcpStream (Content-Length bodies, one request per
//! connection).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zonal_control_plane::{UnitConfig, ZonalConfig, ZonalError};

use crate::fake_unit::FakeUnit;

pub const TOKEN: &str = "test-admin-token-0123456789";
/// A read-only token; the config names only its SHA-256.
pub const READ_ONLY_TOKEN: &str = "test-read-only-token-0123456789";
/// A host's token: attaches and detaches `vol0` and `vol1` for `host-a`
/// only.
pub const ATTACH_TOKEN: &str = "test-attach-token-0123456789";

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap().to_owned()
    }

    pub fn message(&self) -> String {
        self.json()["error"]["message"].as_str().unwrap().to_owned()
    }

    /// Asserts an error answer: its status and its `error.code`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.code(), code, "{}", self.body);
    }
}

pub const GIB: u64 = 1 << 30;

/// One fake unit `u1` (100 GiB free, rack file for `host`) and a zonal
/// control plane over it that has polled it; the directory holds both.
pub async fn one_unit(host: u8) -> (TempDir, Arc<FakeUnit>, Zonal) {
    let dir = tempfile::tempdir().unwrap();
    let unit = FakeUnit::start("u1", host, 100 * GIB).await;
    let zonal = Zonal::start(dir.path(), &[(&unit, host)]).await;
    zonal.wait_units(&["u1"]).await;
    (dir, unit, zonal)
}

pub async fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Response {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let body = body.unwrap_or("");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: zonal\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("response within 30 s")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        !headers
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked bodies are not decoded by this client"
    );
    let status = headers
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    Response {
        status,
        headers: headers.to_owned(),
        body: body.to_owned(),
    }
}

/// A running zonal control plane.
#[derive(Debug)]
pub struct Zonal {
    pub address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ZonalError>>,
}

impl Zonal {
    /// Starts with `units` (their rack files written under `dir`) and the
    /// store in `dir/data`.
    pub async fn start(dir: &Path, units: &[(&Arc<FakeUnit>, u8)]) -> Zonal {
        let units = units
            .iter()
            .map(|(unit, host)| UnitConfig {
                name: unit.name.clone(),
                rack_file: unit.write_rack_file(dir, *host),
                credentials_dir: None,
                host_ca: None,
            })
            .collect();
        let config = ZonalConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.join("data"),
            admin_token: Some(TOKEN.into()),
            admin_token_file: None,
            tokens: vec![
                zonal_control_plane::config::TokenConfig {
                    sha256: zonal_control_plane::config::token_digest(READ_ONLY_TOKEN)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect(),
                    scope: zonal_control_plane::config::Scope::ReadOnly,
                    volumes: vec![],
                    host: None,
                },
                zonal_control_plane::config::TokenConfig {
                    sha256: zonal_control_plane::config::token_digest(ATTACH_TOKEN)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect(),
                    scope: zonal_control_plane::config::Scope::Attach,
                    volumes: vec!["vol0".into(), "vol1".into()],
                    host: Some("host-a".into()),
                },
            ],
            units,
            report_interval_ms: 200,
            tls_cert: None,
            tls_key: None,
            attachment_ttl_ms: None,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(zonal_control_plane::serve(
            config,
            listener,
            shutdown.clone(),
        ));
        Zonal {
            address,
            shutdown,
            task,
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        request(self.address, method, path, Some(TOKEN), body).await
    }

    pub async fn get(&self, path: &str) -> Response {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Response {
        self.call("POST", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.call("DELETE", path, None).await
    }

    /// A request without the admin token (health, metrics, refusals).
    pub async fn get_without_token(&self, path: &str) -> Response {
        request(self.address, "GET", path, None, None).await
    }

    /// `POST /v1/volumes` with a name and a size in GiB (defaults otherwise).
    pub async fn create_volume(&self, name: &str, size_gib: u64) -> Response {
        let body = format!(r#"{{"name":"{name}","size_gib":{size_gib}}}"#);
        self.post("/v1/volumes", &body).await
    }

    /// [`Zonal::create_volume`] that must answer 201 Created; the volume.
    pub async fn create_volume_created(&self, name: &str, size_gib: u64) -> Value {
        let created = self.create_volume(name, size_gib).await;
        assert_eq!(created.status, 201, "create {name}: {}", created.body);
        created.json()
    }

    pub async fn attach(&self, volume: &str, host: &str) -> Response {
        let body = format!(r#"{{"host":"{host}"}}"#);
        self.post(&format!("/v1/volumes/{volume}/attach"), &body)
            .await
    }

    pub async fn detach(&self, volume: &str, attachment_id: u64) -> Response {
        self.delete(&format!("/v1/volumes/{volume}/attachments/{attachment_id}"))
            .await
    }

    /// `POST /v1/volumes/{volume}/resize` to `size_bytes`.
    pub async fn resize(&self, volume: &str, size_bytes: u64) -> Response {
        let body = format!(r#"{{"size_bytes":{size_bytes}}}"#);
        self.post(&format!("/v1/volumes/{volume}/resize"), &body)
            .await
    }

    /// Polls a unit now (`POST /v1/units/{unit}/refresh`).
    pub async fn refresh_unit(&self, unit: &str) -> Response {
        self.call("POST", &format!("/v1/units/{unit}/refresh"), None)
            .await
    }

    /// Asserts that the volume list is empty.
    pub async fn assert_no_volumes(&self) {
        assert_eq!(
            self.get("/v1/volumes").await.json()["volumes"],
            Value::Array(vec![])
        );
    }

    /// Waits until `reachable` units answered a poll (and the rest did not).
    pub async fn wait_units(&self, reachable: &[&str]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let units = self.get("/v1/units").await.json();
            let up: Vec<&str> = units["units"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|u| u["reachable"] == true)
                .map(|u| u["name"].as_str().unwrap())
                .collect();
            let all_checked = units["units"]
                .as_array()
                .unwrap()
                .iter()
                .all(|u| !u["checked_at_ms"].is_null());
            if up == reachable && all_checked {
                return units;
            }
            assert!(
                Instant::now() < deadline,
                "units never became {reachable:?}: {units}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}
