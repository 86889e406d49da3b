//! Mutual TLS between the coordinator and expert nodes (rustls through tonic), one set of flags
//! for both binaries: a node with `--tls-cert/--tls-key` serves only TLS, and with `--tls-ca`
//! accepts only clients whose certificate that CA signed; the coordinator verifies nodes against
//! its `--tls-ca` and presents its own `--tls-cert/--tls-key`. TLS nodes are written
//! `https://host:port`; the host is the name the node's certificate must carry.
//!
//! Handshake failures surface deep in an error chain (hyper → tonic → rustls); [`explain`] turns
//! the usual ones (unknown CA, expired, wrong host name, no client certificate) into a sentence
//! that says what to fix.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// `--tls-cert`, `--tls-key`, `--tls-ca`, shared by `expert-node` and `coordinator`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this process presents: an expert node's server certificate, the
    /// coordinator's client certificate. With --tls-key
    #[arg(long, env = "OMNISHARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = "OMNISHARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): an expert node accepts only clients whose certificate these signed
    /// (and needs --tls-cert too); the coordinator accepts only `https://` nodes these signed
    #[arg(long, env = "OMNISHARD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM block (`-----BEGIN ...`); give a PEM file")]
    NotPem { what: &'static str, path: PathBuf },
    #[error(
        "--tls-ca on an expert node needs --tls-cert and --tls-key: a node checks clients only over TLS"
    )]
    CaWithoutIdentity,
    #[error("{0}")]
    Config(String),
}

impl TlsArgs {
    pub fn is_empty(&self) -> bool {
        self.tls_cert.is_none() && self.tls_key.is_none() && self.tls_ca.is_none()
    }

    fn identity(&self) -> Result<Option<Identity>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(
                read_pem(cert, "--tls-cert")?,
                read_pem(key, "--tls-key")?,
            ))),
            _ => Ok(None),
        }
    }

    fn ca(&self) -> Result<Option<Certificate>, TlsError> {
        self.tls_ca
            .as_deref()
            .map(|p| read_pem(p, "--tls-ca").map(Certificate::from_pem))
            .transpose()
    }

    /// The node's TLS configuration, if it serves TLS. The files are read now, so a missing or
    /// malformed one fails at start-up.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let Some(identity) = self.identity()? else {
            return match self.tls_ca {
                Some(_) => Err(TlsError::CaWithoutIdentity),
                None => Ok(None),
            };
        };
        let mut cfg = ServerTlsConfig::new()
            .identity(identity)
            .timeout(std::time::Duration::from_secs(10));
        if let Some(ca) = self.ca()? {
            cfg = cfg.client_ca_root(ca);
        }
        Ok(Some(cfg))
    }

    /// What the coordinator (or a probe) dials `https://` nodes with, if anything is given.
    pub fn client(&self) -> Result<Option<ClientTls>, TlsError> {
        if self.is_empty() {
            return Ok(None);
        }
        Ok(Some(ClientTls {
            ca: self.ca()?,
            identity: self.identity()?,
        }))
    }
}

/// The coordinator's side of TLS: the CA it trusts and the certificate it presents.
#[derive(Debug, Clone)]
pub struct ClientTls {
    ca: Option<Certificate>,
    identity: Option<Identity>,
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// A node address split into whether it is TLS (`https://`) and its `host:port`.
pub fn split_scheme(address: &str) -> (bool, &str) {
    match address.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, address),
    }
}

/// The endpoint to dial a node at: plaintext for `host:port`, TLS for `https://host:port`
/// (verified against `tls`'s CA, with the host as the expected name).
pub fn endpoint(address: &str, tls: Option<&ClientTls>) -> Result<Endpoint, String> {
    let (secure, authority) = split_scheme(address);
    if !secure {
        return Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| format!("not a valid host:port ({e})"));
    }
    let Some(ClientTls { ca, identity }) = tls else {
        return Err(
            "is an https:// node, but no --tls-ca was given to verify it with; pass --tls-ca (and --tls-cert/--tls-key if the node checks clients)".into(),
        );
    };
    let Some(ca) = ca else {
        return Err(
            "is an https:// node, but no --tls-ca was given to verify it with; pass --tls-ca"
                .into(),
        );
    };
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name(host)
        .timeout(std::time::Duration::from_secs(10));
    if let Some(id) = identity {
        cfg = cfg.identity(id.clone());
    }
    Endpoint::from_shared(format!("https://{authority}"))
        .map_err(|e| format!("not a valid host:port ({e})"))?
        .tls_config(cfg)
        .map_err(|e| format!("cannot set up TLS: {e}"))
}

/// An error and its causes, outermost first: where TLS and connection failures say what went
/// wrong.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// What a failure to reach `address` means, when it is about TLS: the explanation, and whether
/// it is certain (a verdict of the handshake) or likely (a TLS 1.3 server that rejects the
/// client's certificate just closes the connection after the handshake, which a crash could
/// also do).
pub fn diagnose(address: &str, tls: Option<&ClientTls>, chain: &str) -> Option<(String, bool)> {
    if let Some(why) = explain(chain) {
        return Some((why.to_string(), true));
    }
    let (secure, _) = split_scheme(address);
    let closed = ["connection closed", "connection reset", "broken pipe"]
        .iter()
        .any(|s| chain.contains(s));
    if !(secure && closed) {
        return None;
    }
    let why = match tls.and_then(|t| t.identity.as_ref()) {
        None => {
            "the node closed the connection after the TLS handshake: it likely requires a client certificate; give --tls-cert and --tls-key"
        }
        Some(_) => {
            "the node closed the connection after the TLS handshake: it likely does not trust the coordinator's certificate; sign --tls-cert with the CA the node was given as --tls-ca"
        }
    };
    Some((why.to_string(), false))
}

/// What to do about a TLS failure, from the text of its error chain; `None` when it is not one
/// of the common ones.
pub fn explain(chain: &str) -> Option<&'static str> {
    let has = |s: &str| chain.contains(s);
    if has("UnknownIssuer") || has("unknown issuer") {
        Some("the node's certificate is not signed by --tls-ca (unknown CA)")
    } else if has("Expired") || has("expired") {
        Some("a certificate has expired (or is not valid yet): issue a new one")
    } else if has("NotValidForName") || has("not valid for name") {
        Some(
            "the node's certificate does not name the host in its https:// address (wrong host name)",
        )
    } else if has("CertificateRequired") {
        Some(
            "the node requires a client certificate: give the coordinator --tls-cert and --tls-key",
        )
    } else if has("UnknownCA") || has("unknown CA") || has("BadCertificate") {
        Some(
            "the node does not trust the coordinator's certificate: sign --tls-cert with the CA the node was given as --tls-ca",
        )
    } else if has("InvalidContentType") || has("CorruptMessage") || has("frame with invalid size") {
        Some(
            "one side speaks TLS and the other does not: write TLS nodes as https://host:port and plaintext ones as host:port",
        )
    } else {
        None
    }
}
