//! A local multi-process cluster: N `expert-node` processes on free loopback ports, each holding
//! shard i of N, started and health-checked before use and stopped when the [`LocalCluster`] is
//! dropped — on success, on error and on panic. Children also get `PR_SET_PDEATHSIG`, so even a
//! coordinator killed outright (Ctrl-C, SIGKILL) leaves no expert node behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use omnishard_model::{ComputeDtype, DeviceSpec};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    #[error(
        "cannot find the expert-node binary (looked next to {exe} and on PATH); build it with `cargo build --bin expert-node` or pass --expert-node-bin"
    )]
    NoBinary { exe: String },
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("expert node {shard} failed to start: {reason}")]
    Start { shard: String, reason: String },
    #[error(
        "{devices} node devices for {count} nodes: give one device for all of them or one per node (e.g. --node-devices cuda:1,cuda:2)"
    )]
    Devices { devices: usize, count: usize },
    #[error("expert node {shard} at {address} did not become healthy within {seconds} s")]
    Unhealthy {
        shard: String,
        address: String,
        seconds: u64,
    },
}

/// Running expert-node children; dropping this stops them.
pub struct LocalCluster {
    children: Vec<Child>,
    addresses: Vec<String>,
}

/// The `expert-node` binary: next to the current executable (as cargo lays out target/), else
/// the one on PATH.
pub fn find_expert_node_binary() -> Result<PathBuf, LocalClusterError> {
    let exe = std::env::current_exe().unwrap_or_default();
    let name = format!("expert-node{}", std::env::consts::EXE_SUFFIX);
    let mut candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(&name)));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| LocalClusterError::NoBinary {
            exe: exe.display().to_string(),
        })
}

impl LocalCluster {
    /// Starts `count` nodes serving `model` in `dtype` and waits until every one reports
    /// SERVING, or `timeout` passes. `devices`: none (each node's default, the CPU), one for
    /// every node, or one per node (node i on `devices[i]`, e.g. one GPU each). `extra_args` go
    /// to every node (e.g. `--load-format dummy`).
    pub fn start(
        bin: &Path,
        model: &Path,
        count: usize,
        dtype: ComputeDtype,
        timeout: Duration,
        devices: &[DeviceSpec],
        extra_args: &[String],
    ) -> Result<Self, LocalClusterError> {
        if devices.len() > 1 && devices.len() != count {
            return Err(LocalClusterError::Devices {
                devices: devices.len(),
                count,
            });
        }
        let mut cluster = Self {
            children: Vec::with_capacity(count),
            addresses: Vec::with_capacity(count),
        };
        let dtype = dtype.to_string();
        let mut listening = Vec::with_capacity(count);
        for i in 0..count {
            let mut cmd = Command::new(bin);
            cmd.arg("--model")
                .arg(model)
                .args(["--listen", "127.0.0.1:0", "--dtype", &dtype])
                .arg("--shard")
                .arg(format!("{i}/{count}"))
                .args(extra_args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let device = devices.get(i).or(devices.first()).copied();
            if let Some(device) = device {
                cmd.args(["--device", &device.to_string()]);
            }
            die_with_parent(&mut cmd);
            let mut child = cmd.spawn().map_err(|source| LocalClusterError::Spawn {
                bin: bin.to_path_buf(),
                source,
            })?;
            let device = device.unwrap_or_default();
            tracing::info!(pid = child.id(), shard = %format!("{i}/{count}"), %device, "started expert-node");
            eprintln!(
                "cluster: started expert-node {i}/{count} (pid {})",
                child.id()
            );
            let stdout = child.stdout.take();
            cluster.children.push(child);
            // Read "listening on ADDR" on a thread so a silent child cannot hang us.
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                if let Some(out) = stdout {
                    let mut reader = BufReader::new(out);
                    let _ = reader.read_line(&mut line);
                    let _ = tx.send(line);
                    // Keep draining so the child never blocks on a full pipe.
                    let _ = std::io::copy(&mut reader, &mut std::io::sink());
                } else {
                    let _ = tx.send(line);
                }
            });
            listening.push(rx);
        }
        let deadline = Instant::now() + timeout;
        for (i, rx) in listening.into_iter().enumerate() {
            let shard = format!("{i}/{count}");
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(wait).unwrap_or_default();
            let Some(address) = line.trim().strip_prefix("listening on ") else {
                let status = cluster.children[i].try_wait().ok().flatten();
                return Err(LocalClusterError::Start {
                    shard,
                    reason: match status {
                        Some(s) => format!("it exited with {s}; see its messages above"),
                        None => format!("no \"listening on\" line within {} s", timeout.as_secs()),
                    },
                });
            };
            cluster.addresses.push(address.to_string());
        }
        cluster.wait_healthy(deadline, timeout)?;
        Ok(cluster)
    }

    /// host:port of every node, in shard order.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// Process ids of the nodes, in shard order (the benchmark reads their resident memory).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    fn wait_healthy(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), LocalClusterError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LocalClusterError::Start {
                shard: "-".into(),
                reason: e.to_string(),
            })?;
        let count = self.addresses.len();
        for (i, address) in self.addresses.iter().enumerate() {
            let shard = format!("{i}/{count}");
            loop {
                if let Ok(Some(status)) = self.children[i].try_wait() {
                    return Err(LocalClusterError::Start {
                        shard,
                        reason: format!(
                            "it exited with {status} while loading; see its messages above"
                        ),
                    });
                }
                let serving = rt.block_on(async {
                    let channel =
                        tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                            .ok()?
                            .connect()
                            .await
                            .ok()?;
                    let mut client = HealthClient::new(channel);
                    let mut req = tonic::Request::new(HealthCheckRequest {
                        service: "omnishard.v1.ExpertService".into(),
                    });
                    req.set_timeout(Duration::from_secs(2));
                    let resp = client.check(req).await.ok()?;
                    Some(resp.into_inner().status() == ServingStatus::Serving)
                });
                if serving == Some(true) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(LocalClusterError::Unhealthy {
                        shard,
                        address: address.clone(),
                        seconds: timeout.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            terminate(child);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// Asks a child to stop (SIGTERM; it shuts down gracefully), or kills it where signals are not
/// available.
fn terminate(child: &mut Child) {
    #[cfg(unix)]
    {
        // SAFETY: kill(2) on the pid of a child we have not yet reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    #[cfg(not(unix))]
    let _ = child.kill();
}

/// Linux: the child gets SIGKILL when the thread that spawned it exits — the coordinator's main
/// thread — so no node outlives a coordinator that was killed without running destructors.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches only the new process.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
