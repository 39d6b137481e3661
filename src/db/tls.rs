//! TLS to PostgreSQL with rustls, as libpq's `sslmode` and `sslrootcert` describe it.
//!
//! `config::DbUrl::parse` only reads the words (it stays pure); the connector is built
//! here, where the root certificate file is read, so an unreadable or invalid file is a
//! configuration error (exit 2) found before anything connects. What each mode checks:
//!
//! - `disable`: never TLS.
//! - `prefer` (the default; `allow` too): TLS if the server offers it, any certificate.
//! - `require`: TLS or no connection; the chain is checked only if a root certificate
//!   file exists (libpq's rule), the host name never.
//! - `verify-ca`: TLS; the chain must lead to the root certificate; any host name.
//! - `verify-full`: as `verify-ca`, and the certificate must name the host (or IP).
//!
//! The root certificate is `sslrootcert`, else libpq's default `~/.postgresql/root.crt`
//! (`%APPDATA%\postgresql\root.crt` on Windows). Unix-socket connections never use TLS
//! (the server does not offer it there; `DbUrl::parse` sets the driver's mode so).
//! Only the ring crypto provider is used: pure Rust plus a C compiler, no cmake or nasm.

use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres::tls::{MakeTlsConnect, NoTls, NoTlsStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DbUrl, SslMode};
use crate::error::{AppError, Result};

/// The connector every connection and pool uses.
pub type Connector = MakeRustlsConnect;

/// What the server's certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    /// Nothing: any certificate is accepted (the connection is encrypted, not
    /// authenticated), as libpq's `prefer` and `require` without a root certificate.
    Nothing,
    /// The chain must lead to a root in this file; the host name is not checked.
    Chain(PathBuf),
    /// The chain, and the certificate must name the host we connect to.
    ChainAndName(PathBuf),
}

/// Decides the check from the mode and the root certificate settings. Pure: whether
/// the default file exists is passed in.
fn plan(
    mode: SslMode,
    root_cert: Option<&str>,
    default_root: Option<&Path>,
    default_exists: bool,
) -> Result<Check, String> {
    let root_cert = root_cert.filter(|p| !p.is_empty());
    if root_cert == Some("system") && !matches!(mode, SslMode::Disable | SslMode::Prefer) {
        return Err("sslrootcert=system (the operating system's trusted roots) is not supported: \
                    set sslrootcert to the path of the CA certificate (PEM) that signed the server's certificate"
            .into());
    }
    let default = || default_root.filter(|_| default_exists).map(Path::to_path_buf);
    match mode {
        SslMode::Disable | SslMode::Prefer => Ok(Check::Nothing),
        SslMode::Require => Ok(match root_cert.map(PathBuf::from).or_else(default) {
            Some(path) => Check::Chain(path),
            None => Check::Nothing,
        }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let path = root_cert.map(PathBuf::from).or_else(default).ok_or_else(|| {
                let name = if mode == SslMode::VerifyCa { "verify-ca" } else { "verify-full" };
                let tried = match default_root {
                    Some(p) => format!("the default {} does not exist", p.display()),
                    None => "there is no default location (no home folder)".to_string(),
                };
                format!(
                    "sslmode={name} checks the server's certificate, but no root certificate is set: \
                     set sslrootcert to the CA certificate file (PEM) of the server ({tried})"
                )
            })?;
            Ok(if mode == SslMode::VerifyCa { Check::Chain(path) } else { Check::ChainAndName(path) })
        }
    }
}

/// libpq's default root certificate file.
fn default_root_cert() -> Option<PathBuf> {
    #[cfg(windows)]
    let base = std::env::var_os("APPDATA").map(|d| PathBuf::from(d).join("postgresql"));
    #[cfg(not(windows))]
    let base = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql"));
    base.map(|b| b.join("root.crt"))
}

/// Builds the connector `url` asks for, reading its root certificate if the mode needs
/// one. A missing, unreadable or invalid file is a configuration error (exit 2).
pub fn connector(url: &DbUrl) -> Result<Connector> {
    let default_root = default_root_cert();
    let default_exists = default_root.as_deref().is_some_and(Path::is_file);
    let check = plan(url.ssl_mode, url.ssl_root_cert.as_deref(), default_root.as_deref(), default_exists)
        .map_err(AppError::usage)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match &check {
        Check::Nothing => {
            Arc::new(NameUnchecked { roots: None, algorithms: provider.signature_verification_algorithms })
        }
        Check::Chain(path) => Arc::new(NameUnchecked {
            roots: Some(Arc::new(load_roots(path)?)),
            algorithms: provider.signature_verification_algorithms,
        }),
        Check::ChainAndName(path) => {
            WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(path)?), provider.clone())
                .build()
                .map_err(|e| root_error(path, &format!("cannot be used to verify certificates: {e}")))?
        }
    };
    let config = client_config(provider, verifier)
        .map_err(|e| AppError::failed(format!("cannot set up TLS: {e}")).caused_by(e))?;
    Ok(MakeRustlsConnect::new(config))
}

fn client_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<ClientConfig, rustls::Error> {
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn root_error(path: &Path, why: &str) -> AppError {
    AppError::usage(format!("sslrootcert {:?} {why}", path.display().to_string()))
}

/// Reads every PEM certificate in `path` as a trusted root.
fn load_roots(path: &Path) -> Result<RootCertStore> {
    let pem = std::fs::read(path).map_err(|e| root_error(path, &format!("cannot be read: {e}")))?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| root_error(path, &format!("is not a valid PEM file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| root_error(path, &format!("has a certificate (number {}) that is not usable: {e}", i + 1)))?;
    }
    if roots.is_empty() {
        return Err(root_error(path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(roots)
}

/// Verifies the server's certificate without its host name. With `roots`, the chain must
/// lead to one of them (libpq's `verify-ca`); without, any certificate is accepted: the
/// connection is encrypted but the server is not authenticated (`prefer`, and `require`
/// without a root certificate). The handshake signatures are checked either way, so the
/// server holds the key of what it presented.
#[derive(Debug)]
struct NameUnchecked {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A hint for a server certificate we refused, when the reason has a usual fix.
pub fn refusal_hint(err: &postgres::Error) -> Option<&'static str> {
    let io = err.source()?.downcast_ref::<std::io::Error>()?;
    let rustls::Error::InvalidCertificate(why) = io.get_ref()?.downcast_ref::<rustls::Error>()? else {
        return None;
    };
    match why {
        CertificateError::UnknownIssuer => Some(
            "the server's certificate is not signed by a CA in the root certificate file \
             (sslrootcert, else ~/.postgresql/root.crt)",
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => Some(
            "sslmode=verify-full needs the certificate to name the host connected to: \
             connect by a name it lists, or use sslmode=verify-ca",
        ),
        _ => None,
    }
}

/// Why TLS could not be set up for a connection (see `Unusable`).
#[derive(Debug, Clone)]
pub struct SetupError(pub String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SetupError {}

/// A connector that refuses every connection with the reason TLS could not be set up.
/// Commands and the worker check the TLS settings before connecting (exit 2); this only
/// serves a later connection if the root certificate file became unreadable since, so
/// that connection fails with the reason instead of connecting unchecked.
#[derive(Debug, Clone)]
pub struct Unusable(pub SetupError);

impl<S> MakeTlsConnect<S> for Unusable {
    type Stream = NoTlsStream;
    type TlsConnect = NoTls;
    type Error = SetupError;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<NoTls, SetupError> {
        Err(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = "/home/u/.postgresql/root.crt";

    fn plan_of(mode: SslMode, root: Option<&str>, default_exists: bool) -> Result<Check, String> {
        plan(mode, root, Some(Path::new(DEFAULT)), default_exists)
    }

    #[test]
    fn disable_and_prefer_never_check_certificates() {
        for mode in [SslMode::Disable, SslMode::Prefer] {
            for (root, exists) in [(None, false), (None, true), (Some("/ca.crt"), true), (Some("system"), false)] {
                assert_eq!(plan_of(mode, root, exists), Ok(Check::Nothing), "{mode:?} {root:?} {exists}");
            }
        }
    }

    #[test]
    fn require_checks_the_chain_only_when_a_root_certificate_exists() {
        assert_eq!(plan_of(SslMode::Require, None, false), Ok(Check::Nothing));
        assert_eq!(plan_of(SslMode::Require, Some(""), false), Ok(Check::Nothing));
        assert_eq!(plan_of(SslMode::Require, Some("/ca.crt"), false), Ok(Check::Chain("/ca.crt".into())));
        assert_eq!(plan_of(SslMode::Require, None, true), Ok(Check::Chain(DEFAULT.into())));
    }

    #[test]
    fn verify_modes_need_a_root_certificate() {
        assert_eq!(plan_of(SslMode::VerifyCa, Some("/ca.crt"), true), Ok(Check::Chain("/ca.crt".into())));
        assert_eq!(plan_of(SslMode::VerifyFull, Some("/ca.crt"), false), Ok(Check::ChainAndName("/ca.crt".into())));
        assert_eq!(plan_of(SslMode::VerifyFull, None, true), Ok(Check::ChainAndName(DEFAULT.into())));
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let msg = plan_of(mode, None, false).unwrap_err();
            assert!(msg.contains("sslrootcert") && msg.contains(DEFAULT), "{msg}");
            let msg = plan(mode, None, None, false).unwrap_err();
            assert!(msg.contains("sslrootcert"), "{msg}");
        }
    }

    #[test]
    fn the_system_store_is_refused_clearly_where_it_would_be_used() {
        for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
            let msg = plan_of(mode, Some("system"), true).unwrap_err();
            assert!(msg.contains("sslrootcert=system"), "{msg}");
        }
    }

    fn url(s: &str) -> DbUrl {
        DbUrl::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn usage(r: Result<Connector>) -> String {
        match r {
            Err(e) if e.kind() == crate::error::Kind::Usage => e.to_string(),
            Err(other) => panic!("expected a usage error, got {other:?}"),
            Ok(_) => panic!("expected a usage error, got a connector"),
        }
    }

    #[test]
    fn bad_root_certificate_files_are_configuration_errors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("chronicle-tls-unit-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let missing = dir.join("missing.crt");
        let empty = dir.join("empty.crt");
        let garbage = dir.join("garbage.crt");
        let not_a_cert = dir.join("not-a-cert.crt");
        let _ = std::fs::write(&empty, "");
        let _ = std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
        let _ = std::fs::write(&not_a_cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        for (path, why) in [
            (&missing, "cannot be read"),
            (&empty, "holds no PEM certificate"),
            (&garbage, "not a valid PEM file"),
            (&not_a_cert, "not usable"),
        ] {
            let u = url(&format!("postgres://u@localhost/db?sslmode=verify-full&sslrootcert={}", path.display()));
            let msg = usage(connector(&u));
            assert!(
                msg.contains("sslrootcert") && msg.contains(&path.display().to_string()) && msg.contains(why),
                "{msg}"
            );
        }
        // prefer and disable never read it, like libpq.
        for mode in ["prefer", "disable"] {
            let u = url(&format!("postgres://u@localhost/db?sslmode={mode}&sslrootcert={}", missing.display()));
            assert!(connector(&u).is_ok(), "{mode}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
