//! Mutual TLS between the coordinator and real expert-node processes, with certificates made at
//! test time (rcgen): a TLS cluster answers exactly as the in-process model; a node refuses
//! plaintext and clients without a certificate from its CA; the coordinator refuses nodes its CA
//! did not sign, with an expired certificate, or whose certificate names another host — and
//! every refusal says which of these it is.

use std::path::{Path, PathBuf};
use std::process::Command;

use omnishard_tests::pki::{self, Ca};
use omnishard_tests::{ExpertNode, bin, demo_model};

/// A CA, and certificates it signs, written as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A CA, its certificate as `{name}.pem`.
    fn ca(&self, name: &str) -> Ca {
        pki::ca(name, &self.path(&format!("{name}.pem")))
    }

    /// A leaf certificate for `names`, signed by `ca`, as `{name}.pem` and `{name}.key`.
    fn leaf(&self, ca: &Ca, name: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
        );
        pki::leaf(ca, names, expired, &cert, &key);
        (cert, key)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// `coordinator probe --node ADDRESS ARGS...`: its exit status and what it printed.
fn probe(address: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("coordinator"))
        .args(["probe", "--node", address])
        .args(args)
        .output()
        .expect("run coordinator probe");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `coordinator generate` with greedy decoding; its stdout, or its stderr when it fails.
fn generate(args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin("coordinator"))
        .args([
            "generate",
            "--prompt",
            "The lighthouse keeper of Omnishard Island",
        ])
        .args(["--max-tokens", "12", "--temperature", "0"])
        .args(["--startup-timeout-s", "30"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run coordinator generate");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn mutual_tls_serves_exactly_and_refuses_what_it_should_naming_why() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let other = pki.ca("other-ca");
    let (node_cert, node_key) = pki.leaf(&ca, "node", &["localhost"], false);
    let (client_cert, client_key) = pki.leaf(&ca, "client", &["coordinator"], false);
    let (rogue_cert, rogue_key) = pki.leaf(&other, "rogue", &["coordinator"], false);
    let (old_cert, old_key) = pki.leaf(&ca, "old", &["localhost"], true);
    let ca_pem = pki.path("ca.pem");
    let other_pem = pki.path("other-ca.pem");

    let model = demo_model();
    let node = ExpertNode::start(
        &model,
        &[
            "--shard",
            "0/1",
            "--tls-cert",
            s(&node_cert),
            "--tls-key",
            s(&node_key),
            "--tls-ca",
            s(&ca_pem),
        ],
    );
    let port = node
        .address
        .strip_prefix("https://127.0.0.1:")
        .unwrap_or_else(|| {
            panic!(
                "a TLS node prints an https:// address, got {}",
                node.address
            )
        })
        .to_string();
    let tls_node = format!("https://localhost:{port}");
    let client = [
        "--tls-cert",
        s(&client_cert),
        "--tls-key",
        s(&client_key),
        "--tls-ca",
        s(&ca_pem),
    ];

    // Wait until it has loaded (the probe itself goes through mTLS).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (ok, text) = probe(&tls_node, &client);
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the TLS node never became healthy: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // The same greedy text through mutual TLS as in-process.
    let local = generate(&[]).expect("in-process generation");
    let mut remote_args = vec!["--nodes", tls_node.as_str()];
    remote_args.extend(client);
    let remote = generate(&remote_args).expect("generation through mutual TLS");
    assert_eq!(remote, local);

    // Refusals, each naming its cause.
    let plaintext = format!("localhost:{port}");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("plaintext to a TLS node", vec![], ""),
        (
            "no client certificate",
            vec!["--tls-ca", s(&ca_pem)],
            "client certificate",
        ),
        (
            "a client certificate from another CA",
            vec![
                "--tls-cert",
                s(&rogue_cert),
                "--tls-key",
                s(&rogue_key),
                "--tls-ca",
                s(&ca_pem),
            ],
            "does not trust the coordinator's certificate",
        ),
        (
            "a node certificate the coordinator's CA did not sign",
            vec![
                "--tls-cert",
                s(&client_cert),
                "--tls-key",
                s(&client_key),
                "--tls-ca",
                s(&other_pem),
            ],
            "unknown CA",
        ),
    ];
    for (what, args, cause) in cases {
        let address = if args.is_empty() {
            &plaintext
        } else {
            &tls_node
        };
        let (ok, text) = probe(address, &args);
        assert!(!ok, "{what}: the probe passed: {text}");
        assert!(text.contains(cause), "{what}: {text}");
    }
    // The host name in the address must be one the certificate names.
    let wrong_host = format!("https://127.0.0.1:{port}");
    let (ok, text) = probe(&wrong_host, &client);
    assert!(!ok && text.contains("wrong host name"), "{text}");
    // The coordinator itself fails at once (no waiting for a misconfiguration), saying why.
    let mut rogue_args = vec!["--nodes", tls_node.as_str()];
    rogue_args.extend(["--tls-ca", s(&other_pem)]);
    let started = std::time::Instant::now();
    let err = generate(&rogue_args).expect_err("an unknown CA is refused");
    assert!(err.contains("unknown CA"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{err}"
    );
    drop(node);

    // An expired node certificate.
    let old = ExpertNode::start(
        &model,
        &[
            "--shard",
            "0/1",
            "--tls-cert",
            s(&old_cert),
            "--tls-key",
            s(&old_key),
        ],
    );
    let port = old.address.rsplit(':').next().expect("a port").to_string();
    let (ok, text) = probe(
        &format!("https://localhost:{port}"),
        &["--tls-ca", s(&ca_pem)],
    );
    assert!(!ok && text.contains("expired"), "{text}");

    // Flags that cannot work are refused at start-up.
    let out = Command::new(bin("expert-node"))
        .args([
            "--shard",
            "0/1",
            "--tls-ca",
            s(&ca_pem),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run expert-node");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --tls-cert"));
    let (ok, text) = probe(&format!("https://localhost:{port}"), &[]);
    assert!(!ok && text.contains("no --tls-ca"), "{text}");
}
