//! TLS configurations for every TLS edge of rackblock (rustls with the
//! `ring` provider, TLS 1.2 and 1.3): the server side from a certificate
//! chain and key in PEM files ([`server_config`], [`acceptor`]), the client
//! side trusting the CA certificates of one PEM file ([`connector`]).
//!
//! The edges: the attach agent's NBD `STARTTLS` (`client::nbd`), the zonal
//! API over HTTPS (`crate::http::serve` with [`HttpTls`](crate::http::HttpTls)),
//! and the CLI and attach agent as clients of that API. The local CA that
//! `rackblock up` and `rackblock tls init` make is in `client::tls`.
//! Servers ask for no client certificate: who may do what is decided by
//! the credential each request carries (bearer token, attachment token).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A TLS stream a client opened.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no {what} in the PEM file")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

// `ring` rather than `aws-lc-rs`: it builds without cmake or a C toolchain
// beyond cc. rustls 0.23.48 deprecates its provider because it lacks
// post-quantum key exchange (X25519MLKEM768); the classical groups it has
// are what libnbd, qemu (GnuTLS) and curl negotiate today.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(io_error(path))?;
    certs_from_pem(&pem, path)
}

/// The certificates of PEM text (at least one); `path` names its origin in
/// errors.
pub fn certs_from_pem(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_error(path))?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// A server configuration serving the chain in `cert` with the key in
/// `key` (PEM), no client certificates.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = load_certs(cert)?;
    let pem = std::fs::read(key).map_err(io_error(key))?;
    let private_key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(io_error(key))?
        .ok_or_else(|| TlsError::Missing {
            path: key.to_owned(),
            what: "private key",
        })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)?;
    Ok(Arc::new(config))
}

/// [`server_config`] as a tokio acceptor.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(server_config(cert, key)?))
}

/// A client trusting exactly the CA certificates in `ca` (PEM), checking
/// the server's name as usual.
pub fn connector(ca: &Path) -> Result<TlsConnector, TlsError> {
    let pem = std::fs::read(ca).map_err(io_error(ca))?;
    connector_from_pem(&pem, ca)
}

/// [`connector`] from the PEM text itself (a CA that came inside an
/// attachment); `origin` names where it came from in errors.
pub fn connector_from_pem(pem: &[u8], origin: &Path) -> Result<TlsConnector, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs_from_pem(pem, origin)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: origin.to_owned(),
            reason: e.to_string(),
        })?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Opens TLS on `tcp` to the server named `host` (a DNS name or an IP
/// address, as in its certificate).
pub async fn connect(
    connector: &TlsConnector,
    host: &str,
    tcp: TcpStream,
) -> std::io::Result<ClientStream> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{host:?} is not a server name: {e}"),
        )
    })?;
    connector.connect(name, tcp).await
}
