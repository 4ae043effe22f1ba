//! A small HTTP/1.1 client for the zonal control plane's JSON API.
//!
//! One request per connection (`Connection: close`): the operator verbs
//! make a handful of calls, so keep-alive buys nothing and reading to EOF
//! keeps the parser small. Responses are bounded ([`MAX_RESPONSE_BYTES`])
//! and so is every call ([`ZonalApi::timeout`]). Bodies with
//! `Content-Length` or `Transfer-Encoding: chunked` are both understood.
//!
//! **HTTPS**: an `https://` URL needs the CA certificate that signed the
//! zonal plane's certificate (`--zonal-ca`, env `RACKBLOCK_ZONAL_CA`, by
//! default `rackblock-data/tls/ca.pem` when it exists); only that CA is
//! trusted and the certificate must name the URL's host. There is no
//! fallback to plain HTTP.
//!
//! Non-2xx answers become [`CliError::Api`] carrying the status and the
//! API's `{"error": {"code", "message"}}`; [`CliError::exit_code`] turns
//! them into exit codes.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::error::CliError;

/// Largest response accepted (a describe of a large volume's map stays far
/// below).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Default bound of one call: above the zonal plane's 15 s unit command
/// timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the zonal API is and how to authenticate.
#[derive(Clone)]
pub struct ZonalApi {
    /// `host:port` as given (resolved at every call).
    authority: String,
    /// Path prefix of the URL without a trailing '/', usually empty.
    prefix: String,
    token: Option<String>,
    pub timeout: Duration,
    url: String,
    /// HTTPS: the connector trusting the given CA, and the server name the
    /// certificate must carry (the URL's host).
    tls: Option<(proto::tls::TlsConnector, String)>,
}

impl std::fmt::Debug for ZonalApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZonalApi")
            .field("url", &self.url)
            .field("https", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A successful answer: status (2xx) and JSON body (`Null` when empty).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl ZonalApi {
    /// Parses `http[s]://host:port[/prefix]` (the scheme may be omitted:
    /// http). `https` needs `ca`, the PEM file of the CA to trust.
    pub fn new(url: &str, token: Option<String>, ca: Option<&Path>) -> Result<ZonalApi, CliError> {
        let trimmed = url.trim();
        let (rest, https) = if let Some(rest) = trimmed.strip_prefix("http://") {
            (rest, false)
        } else if let Some(rest) = trimmed.strip_prefix("https://") {
            (rest, true)
        } else if trimmed.contains("://") {
            return Err(CliError::Usage(format!(
                "--zonal {url}: not an http:// or https:// URL"
            )));
        } else {
            (trimmed, false)
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(CliError::Usage(format!("--zonal {url}: no host:port")));
        }
        let has_port = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']'))
        });
        let authority = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:{}", if https { 443 } else { 80 })
        };
        let tls = if https {
            let Some(ca) = ca else {
                return Err(CliError::Usage(format!(
                    "--zonal {url}: https needs the CA certificate to trust (--zonal-ca FILE or RACKBLOCK_ZONAL_CA)"
                )));
            };
            let connector = proto::tls::connector(ca)
                .map_err(|e| CliError::Usage(format!("--zonal-ca: {e}")))?;
            let host = authority
                .rsplit_once(':')
                .map_or(authority.as_str(), |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            Some((connector, host))
        } else {
            None
        };
        Ok(ZonalApi {
            authority,
            prefix: path.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.trim().is_empty()),
            timeout: DEFAULT_TIMEOUT,
            url: trimmed.to_owned(),
            tls,
        })
    }

    /// GET/POST/DELETE `path` (already encoded) with an optional JSON body.
    /// 2xx → [`Reply`]; anything else → [`CliError::Api`]; no answer →
    /// [`CliError::Unavailable`].
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, CliError> {
        let exchange = self.exchange(method, path, body);
        let (status, bytes) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(CliError::Unavailable(format!(
                    "the zonal control plane at {} did not answer {method} {path} within {:?}",
                    self.url, self.timeout
                )))
            }
        };
        let json = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice::<Value>(&bytes).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&bytes).trim().to_owned())
            })
        };
        if (200..300).contains(&status) {
            return Ok(Reply { status, body: json });
        }
        let (code, message) = match &json {
            Value::Object(map) => match map.get("error") {
                Some(Value::Object(error)) => (
                    error
                        .get("code")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_owned(),
                    error
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("(no message)")
                        .to_owned(),
                ),
                _ => ("unknown".to_owned(), json.to_string()),
            },
            Value::String(text) if !text.is_empty() => ("unknown".to_owned(), text.clone()),
            _ => ("unknown".to_owned(), format!("HTTP {status}")),
        };
        Err(CliError::Api {
            status,
            code,
            message,
        })
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), CliError> {
        let tcp = TcpStream::connect(&self.authority).await.map_err(|e| {
            CliError::Unavailable(format!(
                "cannot reach the zonal control plane at {}: {e} (is `rackblock zonal` running? see --zonal)",
                self.url
            ))
        })?;
        match &self.tls {
            None => self.exchange_on(tcp, method, path, body).await,
            Some((connector, host)) => {
                let stream = proto::tls::connect(connector, host, tcp)
                    .await
                    .map_err(|e| {
                        CliError::Unavailable(format!(
                            "TLS with the zonal control plane at {} failed: {e} (does --zonal-ca hold the CA that signed its certificate, for host {host}?)",
                            self.url
                        ))
                    })?;
                self.exchange_on(stream, method, path, body).await
            }
        }
    }

    async fn exchange_on<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), CliError> {
        let unavailable = |what: String| CliError::Unavailable(what);
        let payload = match body {
            Some(value) => serde_json::to_vec(value)
                .map_err(|e| CliError::Runtime(format!("cannot encode the request: {e}")))?,
            None => Vec::new(),
        };
        let mut request = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rackblock-cli\r\nAccept: application/json\r\nConnection: close\r\n",
            self.prefix, self.authority
        );
        if let Some(token) = &self.token {
            request.push_str(&format!("Authorization: Bearer {}\r\n", token.trim()));
        }
        if body.is_some() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(&payload);
        let lost = |e: std::io::Error| {
            unavailable(format!(
                "the zonal control plane at {} dropped the connection: {e}",
                self.url
            ))
        };
        stream.write_all(&bytes).await.map_err(lost)?;
        stream.flush().await.map_err(lost)?;
        let mut response = Vec::new();
        let mut limited = (&mut stream).take(MAX_RESPONSE_BYTES as u64 + 1);
        match limited.read_to_end(&mut response).await {
            Ok(_) => {}
            // A TLS peer that closes without close_notify: the answer is
            // still whole if its length checks out (parse_response).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
            Err(e) => return Err(lost(e)),
        }
        if response.len() > MAX_RESPONSE_BYTES {
            return Err(CliError::Runtime(format!(
                "the answer of {method} {path} exceeds {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        parse_response(&response).map_err(|reason| {
            CliError::Runtime(format!(
                "the zonal control plane at {} answered {method} {path} with a malformed response: {reason}",
                self.url
            ))
        })
    }
}

/// Splits a full HTTP/1.1 response into status and body.
fn parse_response(response: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&response[..split]).map_err(|_| "headers are not UTF-8")?;
    let body = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    if chunked {
        return Ok((status, dechunk(body)?));
    }
    match content_length {
        Some(length) if length > body.len() => {
            Err(format!("body cut short: {} of {length} bytes", body.len()))
        }
        Some(length) => Ok((status, body[..length].to_vec())),
        None => Ok((status, body.to_vec())),
    }
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line missing")?;
        let line = std::str::from_utf8(&body[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("chunk cut short".into());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let api = ZonalApi::new("http://127.0.0.1:9000", None, None).unwrap();
        assert_eq!(api.authority, "127.0.0.1:9000");
        assert_eq!(api.prefix, "");
        let api = ZonalApi::new("zonal.example:8080/api/", Some(" ".into()), None).unwrap();
        assert_eq!(api.authority, "zonal.example:8080");
        assert_eq!(api.prefix, "/api");
        assert!(api.token.is_none());
        assert_eq!(
            ZonalApi::new("http://host", None, None).unwrap().authority,
            "host:80"
        );
        // https needs a CA to trust; with one, the host is the TLS name.
        assert!(ZonalApi::new("https://host:1", None, None).is_err());
        let dir = tempfile::tempdir().unwrap();
        let files = client::tls::ensure(dir.path()).unwrap();
        let api = ZonalApi::new("https://127.0.0.1", None, Some(&files.ca_cert)).unwrap();
        assert_eq!(api.authority, "127.0.0.1:443");
        assert_eq!(api.tls.as_ref().unwrap().1, "127.0.0.1");
        assert!(ZonalApi::new("http://h:1", None, Some(&files.ca_cert))
            .unwrap()
            .tls
            .is_none());
        // A file without a certificate is refused up front.
        assert!(ZonalApi::new("https://h:1", None, Some(&files.server_key)).is_err());
        assert!(ZonalApi::new("ftp://host:1", None, None).is_err());
        assert!(ZonalApi::new("http:///x", None, None).is_err());
    }

    #[test]
    fn responses() {
        let (status, body) =
            parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((status, body.as_slice()), (201, &b"{}"[..]));
        let (status, body) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"abcde"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab").is_err());
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn segments() {
        assert_eq!(segment("vol-0.a_b~"), "vol-0.a_b~");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }
}
