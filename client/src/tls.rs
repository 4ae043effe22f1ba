//! TLS at the edges: the attach agent's NBD `STARTTLS` (rustls with the
//! `ring` provider) and the local certificate authority `rackblock up` and
//! `rackblock tls init` create.
//!
//! **Files** ([`TlsFiles`], one directory): `ca.pem` / `ca.key` (the CA,
//! self-signed, ECDSA P-256), `server.pem` / `server.key` (the server
//! certificate the CA signed, for the names given, by default
//! `localhost` and `127.0.0.1`), and `client/ca-cert.pem`, a copy of the CA
//! certificate in the directory layout GnuTLS clients (libnbd's
//! `tls-certificates=DIR`, qemu's `tls-creds-x509,dir=DIR`) read. Keys are
//! written with mode 0600 and never overwritten: [`ensure`] reuses what is
//! there, so a restart keeps the CA clients already trust.
//!
//! **More server certificates from the same CA** ([`issue`]): `NAME.pem` /
//! `NAME.key` in the directory, for other names (a head node's host port
//! is served with `host-<id>.pem`, for its IP address; `rackblock up` and
//! `rackblock tls issue` make them). The CA certificate is rebuilt in
//! memory from `ca.key` and the CA's fixed parameters to sign them (rcgen
//! signs with an issuer `Certificate`; the rebuilt one has the on-disk
//! CA's subject and key, so what it signs chains to `ca.pem`).
//!
//! The server does not ask for client certificates: on the NBD edge, TLS
//! keeps the data private and authenticates the agent to its host's
//! clients; who may attach is decided by the attachment credential.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::TlsAcceptor;

/// Why TLS material could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(transparent)]
    Load(#[from] proto::tls::TlsError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The paths of one TLS directory (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The directory to give libnbd / qemu clients (holds `ca-cert.pem`).
    pub client_dir: PathBuf,
}

impl TlsFiles {
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_dir: dir.join("client"),
        }
    }

    fn all_exist(&self) -> bool {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
        ]
        .iter()
        .all(|p| p.exists())
            && self.client_dir.join("ca-cert.pem").exists()
    }
}

/// Write `contents` to a new file `path` with `mode` (fails if it exists).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(contents).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// The local CA's parameters: the same every time, so that the CA can be
/// rebuilt from its key to sign more certificates ([`issue`]).
fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "rackblock local CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// A server certificate's parameters for `names` (DNS names or IP
/// addresses: rcgen makes each a SAN of the right kind).
fn server_params(names: &[String]) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(names.to_vec())?;
    let common_name = names.first().map_or("rackblock", String::as_str);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

/// A server certificate and key (`NAME.pem`, `NAME.key` in `dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A server certificate for `names`, signed by the CA in `dir` (module
/// docs), as `dir/NAME.pem` and `dir/NAME.key`. When both exist already
/// they are kept and returned unless `replace` (a new address needs a new
/// certificate); one without the other is replaced.
pub fn issue(
    dir: &Path,
    name: &str,
    names: &[String],
    replace: bool,
) -> Result<IssuedFiles, TlsError> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(TlsError::Io {
            path: dir.join(name),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a certificate name is a plain file name",
            ),
        });
    }
    let files = TlsFiles::in_dir(dir);
    let issued = IssuedFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    if !replace && issued.cert.exists() && issued.key.exists() {
        return Ok(issued);
    }
    let ca_pem = std::fs::read_to_string(&files.ca_key).map_err(io_error(&files.ca_key))?;
    let ca_key = KeyPair::from_pem(&ca_pem)?;
    let ca = ca_params()?.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let cert = server_params(names)?.signed_by(&key, &ca, &ca_key)?;
    for path in [&issued.cert, &issued.key] {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(TlsError::Io {
                    path: path.clone(),
                    source: e,
                })
            }
        }
    }
    write_new(&issued.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&issued.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(issued)
}

/// A new CA and a server certificate for `names` (DNS names or IP
/// addresses) in `dir`; fails if any of the files exists.
pub fn generate(dir: &Path, names: &[String]) -> Result<TlsFiles, TlsError> {
    let files = TlsFiles::in_dir(dir);
    std::fs::create_dir_all(&files.client_dir).map_err(io_error(&files.client_dir))?;

    let ca_key = KeyPair::generate()?;
    let ca = ca_params()?.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let server = server_params(names)?.signed_by(&server_key, &ca, &ca_key)?;

    write_new(&files.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(
        &files.server_key,
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&files.ca_cert, ca.pem().as_bytes(), 0o644)?;
    write_new(&files.server_cert, server.pem().as_bytes(), 0o644)?;
    write_new(
        &files.client_dir.join("ca-cert.pem"),
        ca.pem().as_bytes(),
        0o644,
    )?;
    Ok(files)
}

/// The files in `dir`, generated for `localhost` / `127.0.0.1` if they are
/// not all there yet.
pub fn ensure(dir: &Path) -> Result<TlsFiles, TlsError> {
    let files = TlsFiles::in_dir(dir);
    if files.all_exist() {
        return Ok(files);
    }
    generate(dir, &default_names())
}

/// The names a local server certificate is made for.
pub fn default_names() -> Vec<String> {
    vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
}

/// A TLS acceptor serving the certificate chain in `cert` with the key in
/// `key` (PEM), no client certificates, TLS 1.2 and 1.3
/// ([`proto::tls::acceptor`]).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    Ok(proto::tls::acceptor(cert, key)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_files_load_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure(dir.path()).unwrap();
        for key in [&files.ca_key, &files.server_key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        acceptor(&files.server_cert, &files.server_key).unwrap();
        // A second ensure keeps the CA; a second generate refuses.
        let ca = std::fs::read(&files.ca_cert).unwrap();
        assert_eq!(ensure(dir.path()).unwrap(), files);
        assert_eq!(std::fs::read(&files.ca_cert).unwrap(), ca);
        assert!(generate(dir.path(), &default_names()).is_err());
        // A key file given as the certificate is refused with a reason.
        let Err(error) = acceptor(&files.server_key, &files.server_key) else {
            panic!("a key file was taken for a certificate");
        };
        assert!(
            matches!(error, TlsError::Load(proto::tls::TlsError::Missing { .. })),
            "{error}"
        );
    }

    /// A certificate `issue` makes chains to the CA on disk and names the
    /// IP address it was made for; kept unless replaced.
    #[tokio::test]
    async fn issued_certificate_chains_to_the_ca_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure(dir.path()).unwrap();
        let issued = issue(dir.path(), "host-hn-1", &["127.0.0.3".to_owned()], false).unwrap();
        let mode = std::fs::metadata(&issued.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem = std::fs::read(&issued.cert).unwrap();
        assert_eq!(issue(dir.path(), "host-hn-1", &[], false).unwrap(), issued);
        assert_eq!(std::fs::read(&issued.cert).unwrap(), pem, "kept");
        assert!(issue(dir.path(), "../x", &[], false).is_err());

        let acceptor = acceptor(&issued.cert, &issued.key).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.map(|_| ())
        });
        let connector = proto::tls::connector(&files.ca_cert).unwrap();
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        proto::tls::connect(&connector, "127.0.0.3", tcp)
            .await
            .unwrap();
        server.await.unwrap().unwrap();

        // The same certificate does not name another address.
        let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor2 = super::acceptor(&issued.cert, &issued.key).unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor2.accept(tcp).await;
        });
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let error = proto::tls::connect(&connector, "127.0.0.4", tcp)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("certificate"), "{error}");
        server.await.unwrap();
    }
}
