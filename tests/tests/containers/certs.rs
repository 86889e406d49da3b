//! Certificates for the container test's mutual-TLS cluster, made at test time with rcgen, in
//! the file names deploy/compose.tls.yaml mounts: the cluster's CA (ca.crt), the nodes'
//! certificate (node.crt/key, valid for their compose service names and localhost), the
//! coordinator's (coordinator.crt/key), and another CA (rogue-ca.crt) with a client certificate
//! it signed (rogue.crt/key, for the same names).

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// The names the nodes' certificate is valid for.
const NODE_NAMES: [&str; 5] = [
    "expert-0a",
    "expert-0b",
    "expert-1a",
    "expert-1b",
    "localhost",
];

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A self-signed CA written as `{name}.crt`.
fn ca(dir: &Path, name: &str) -> Issuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().expect("a key");
    let cert = params.self_signed(&key).expect("a self-signed CA");
    write(dir, &format!("{name}.crt"), &cert.pem());
    Issuer::new(params, key)
}

/// A certificate for `names` signed by `issuer`, written as `{name}.crt` and `{name}.key`.
fn leaf(dir: &Path, issuer: &Issuer<'static, KeyPair>, name: &str, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let params = CertificateParams::new(names).expect("leaf params");
    let key = KeyPair::generate().expect("a key");
    let cert = params.signed_by(&key, issuer).expect("signed");
    write(dir, &format!("{name}.crt"), &cert.pem());
    write(dir, &format!("{name}.key"), &key.serialize_pem());
}

/// Writes every file named in the module's header into `dir`.
pub fn make(dir: &Path) {
    let cluster = ca(dir, "ca");
    leaf(dir, &cluster, "node", &NODE_NAMES);
    leaf(dir, &cluster, "coordinator", &["omnishard-coordinator"]);
    let rogue = ca(dir, "rogue-ca");
    leaf(dir, &rogue, "rogue", &NODE_NAMES);
}
