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

/// A new CA and a server certificate for `names` (DNS names or IP
/// addresses) in `dir`; fails if any of the files exists.
pub fn generate(dir: &Path, names: &[String]) -> Result<TlsFiles, TlsError> {
    let files = TlsFiles::in_dir(dir);
    std::fs::create_dir_all(&files.client_dir).map_err(io_error(&files.client_dir))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rackblock local CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
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
    let server = params.signed_by(&server_key, &ca, &ca_key)?;

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
}
