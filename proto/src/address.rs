//! Addresses as users write them: a node's `HOST:PORT`, or `https://HOST:PORT` for a TLS node
//! (checked when given, not when first dialled, so a typo fails at start-up instead of after the
//! connect timeout), and a listen address that may name its host (`localhost:8000`).

use std::net::{SocketAddr, ToSocketAddrs};

/// Checks a node address: `HOST:PORT` or `https://HOST:PORT`, host a name, IPv4 address or
/// bracketed IPv6 address.
pub fn check_node_address(address: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "node address `{address}` {why}; write HOST:PORT, e.g. 10.0.0.2:50051 or node-0.experts:50051 (https://HOST:PORT for a TLS node)"
        ))
    };
    let (_, address) = crate::tls::split_scheme(address);
    if address.contains("://") {
        return bad("has a scheme other than https://");
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return bad("has no port");
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return bad("has no valid port (1 to 65535)");
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let valid_name = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    if host.is_empty() || !valid_name {
        return bad("has no valid host");
    }
    Ok(())
}

/// The address to listen on: `HOST:PORT` with an IP address or a name resolved now (the first
/// address it resolves to).
pub fn resolve_listen(address: &str) -> Result<SocketAddr, String> {
    let hint = "write HOST:PORT, e.g. 127.0.0.1:8000, 0.0.0.0:8000 or localhost:8000";
    let mut addrs = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot use `{address}` as a listen address ({e}); {hint}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("`{address}` resolves to no address; {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses() {
        for ok in [
            "10.0.0.2:50051",
            "node-0.experts.svc:1",
            "[::1]:50051",
            "localhost:9",
            "https://node-0.experts:50051",
        ] {
            assert!(check_node_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "foo",
            "foo:",
            ":50051",
            "foo:0",
            "foo:70000",
            "http://foo:1",
            "https://foo",
            "a b:1",
        ] {
            let err = check_node_address(bad).unwrap_err();
            assert!(err.contains(bad) && err.contains("HOST:PORT"), "{err}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            resolve_listen("127.0.0.1:8000").unwrap(),
            "127.0.0.1:8000".parse().unwrap()
        );
        assert!(resolve_listen("localhost:0").unwrap().ip().is_loopback());
        assert!(resolve_listen("localhost").is_err());
    }
}
