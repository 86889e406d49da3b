//! `coordinator probe`: a health check for containers, whose minimal images carry no curl or
//! grpc_health_probe. `--url` asks the coordinator's `GET /health` (plain HTTP, as a probe
//! inside the pod or container reaches it); `--node` asks an expert node's standard gRPC health
//! service (`grpc.health.v1.Health/Check` for `omnishard.v1.ExpertService`), over TLS for an
//! `https://` node, with the same --tls-* flags as the node and the coordinator.

use std::time::Duration;

use clap::Args;
use omnishard_proto::tls::{ClientTls, TlsArgs, diagnose, endpoint, error_chain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The gRPC service an expert node reports on.
const NODE_SERVICE: &str = "omnishard.v1.ExpertService";

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["url", "node"])))]
pub struct ProbeArgs {
    /// A coordinator's health URL, e.g. http://127.0.0.1:8000/health: healthy when it answers
    /// 200 (503 while loading, without live nodes for some experts, or shutting down).
    #[arg(long)]
    url: Option<String>,
    /// An expert node, HOST:PORT or https://HOST:PORT: healthy when its gRPC health is SERVING
    /// (NOT_SERVING while it loads and once it is shutting down).
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3)]
    timeout_s: u64,
}

/// Runs the probe: `Ok` with what was seen when healthy, `Err` saying why not.
pub fn run(args: &ProbeArgs) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let timeout = Duration::from_secs(args.timeout_s.max(1));
    let check = async {
        match (&args.url, &args.node) {
            (Some(url), _) => http_health(url).await,
            (None, Some(node)) => node_health(node, &args.tls).await,
            (None, None) => Err("give --url or --node".into()),
        }
    };
    runtime.block_on(async {
        tokio::time::timeout(timeout, check)
            .await
            .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
    })
}

/// `GET` over plain HTTP/1.1; healthy on status 200.
async fn http_health(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}` is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    // Status line and a little of the body (the reason, when unhealthy) are all a probe needs.
    let mut head = Vec::with_capacity(4096);
    let _ = (&mut stream)
        .take(64 * 1024)
        .read_to_end(&mut head)
        .await
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    let text = String::from_utf8_lossy(&head);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| "the answer is not HTTP".to_string())?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if status == "200" {
        Ok(format!("{url}: 200 {body}"))
    } else {
        Err(format!("{url}: {status} {body}"))
    }
}

async fn node_health(node: &str, tls: &TlsArgs) -> Result<String, String> {
    omnishard_proto::address::check_node_address(node)?;
    let client_tls = tls.client().map_err(|e| e.to_string())?;
    let channel = endpoint(node, client_tls.as_ref())
        .map_err(|e| format!("{node} {e}"))?
        .connect()
        .await
        .map_err(|e| failure(node, client_tls.as_ref(), &e))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: NODE_SERVICE.into(),
        })
        .await
        .map_err(|s| failure(node, client_tls.as_ref(), &s))?;
    let status = answer.into_inner().status();
    match status {
        ServingStatus::Serving => Ok(format!("{node}: SERVING")),
        other => Err(format!("{node}: {}", other.as_str_name())),
    }
}

/// An error with its causes, and what to do when it is a TLS failure.
fn failure(node: &str, tls: Option<&ClientTls>, e: &(dyn std::error::Error + 'static)) -> String {
    let chain = error_chain(e);
    match diagnose(node, tls, &chain) {
        Some((why, _)) => format!("{node}: TLS failed: {why} ({chain})"),
        None => format!("{node}: {chain}"),
    }
}
