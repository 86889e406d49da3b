//! Certificates made at test time (rcgen) for the mutual-TLS tests, written as PEM files: a
//! self-signed CA, and leaf certificates it signs (valid now, or expired), for given names.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A CA that signs leaves.
pub type Ca = Issuer<'static, KeyPair>;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A self-signed CA named `name`, its certificate written to `cert`.
pub fn ca(name: &str, cert: &Path) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().expect("a key");
    let signed = params.self_signed(&key).expect("a self-signed CA");
    write(cert, &signed.pem());
    Issuer::new(params, key)
}

/// A certificate for `names` signed by `ca`, written to `cert` and its key to `key`; `expired`
/// makes one whose validity ended in 2021.
pub fn leaf(ca: &Ca, names: &[&str], expired: bool, cert: &Path, key: &Path) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf params");
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let pair = KeyPair::generate().expect("a key");
    let signed = params.signed_by(&pair, ca).expect("signed");
    write(cert, &signed.pem());
    write(key, &pair.serialize_pem());
}
