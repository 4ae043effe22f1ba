//! An in-process zonal control plane on 127.0.0.1:0 and a minimal HTTP/1.1
//! client over a tokio TcpStream (Content-Length bodies, one request per
//! connection).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zonal_control_plane::{UnitConfig, ZonalConfig, ZonalError};

use crate::fake_unit::FakeUnit;

pub const TOKEN: &str = "test-admin-token-0123456789";

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
            })
            .collect();
        let config = ZonalConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.join("data"),
            admin_token: Some(TOKEN.into()),
            admin_token_file: None,
            units,
            report_interval_ms: 200,
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
