//! Certificates for the container test's mutual-TLS cluster, made at test time with rcgen, in
//! the file names deploy/compose.tls.yaml mounts: the cluster's CA (ca.crt), the nodes'
//! certificate (node.crt/key, valid for their compose service names and localhost), the
//! coordinator's (coordinator.crt/key), and another CA (rogue-ca.crt) with a client certificate
//! it signed (rogue.crt/key, for the same names).

use std::path::Path;

use omnishard_tests::pki::{ca, leaf};

/// The names the nodes' certificate is valid for.
const NODE_NAMES: [&str; 5] = [
    "expert-0a",
    "expert-0b",
    "expert-1a",
    "expert-1b",
    "localhost",
];

/// Writes every file named in the module's header into `dir`.
pub fn make(dir: &Path) {
    let cluster = ca("ca", &dir.join("ca.crt"));
    let signed = |ca, name: &str, names: &[&str]| {
        leaf(
            ca,
            names,
            false,
            &dir.join(format!("{name}.crt")),
            &dir.join(format!("{name}.key")),
        )
    };
    signed(&cluster, "node", &NODE_NAMES);
    signed(&cluster, "coordinator", &["omnishard-coordinator"]);
    let rogue = ca("rogue-ca", &dir.join("rogue-ca.crt"));
    signed(&rogue, "rogue", &NODE_NAMES);
}
