//! Docker plumbing of the container test: commands with deadlines, the locally made test base
//! image and the omnishard image built on it from the host's binaries (deploy/Dockerfile's
//! `prebuilt` stage), and a compose project that is torn down when dropped, even on failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use omnishard_tests::{bin, tests_dir};

/// The repository root.
pub fn repo_root() -> PathBuf {
    tests_dir().join("..")
}

/// Output of a finished command.
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Both streams, for failure messages.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs a command to completion, killing it at the deadline: `Err` says what happened when it
/// could not be started or ran out of time.
pub fn run_with(mut cmd: Command, limit: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    // Drain both pipes on threads so a chatty command cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: still running after {limit:?}, killed"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    Ok(Output {
        ok: status.success(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Runs `program args...` within `limit`; the test fails unless it succeeds.
pub fn must(program: &str, args: &[&str], limit: Duration) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = run_with(cmd, limit).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.ok, "{program} {args:?} failed:\n{}", out.text());
    out.stdout
}

/// Why the container test cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let probe = |program: &str, args: &[&str]| {
        let mut cmd = Command::new(program);
        cmd.args(args);
        match run_with(cmd, Duration::from_secs(30)) {
            Ok(out) if out.ok => None,
            Ok(out) => Some(format!(
                "`{program} {}` failed: {}",
                args.join(" "),
                out.text().trim()
            )),
            Err(e) => Some(e),
        }
    };
    probe("docker", &["info", "--format", "{{.ServerVersion}}"])
        .map(|why| format!("no Docker daemon answers ({why})"))
        .or_else(|| probe("docker-compose", &["version"]))
        .or_else(|| probe("ldd", &["--version"]))
}

/// A name unique to this run, for images and the compose project.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}x{nanos:x}", std::process::id())
}

/// The test base image (the host's runtime libraries of both binaries and an empty /tmp,
/// `docker import`ed) and the omnishard image built on it with `--target prebuilt`; both are
/// removed when dropped.
pub struct Images {
    pub base: String,
    pub image: String,
}

impl Images {
    pub fn build() -> Self {
        let tag = unique("");
        let images = Self {
            base: format!("omnishard-test-base:{tag}"),
            image: format!("omnishard-test:{tag}"),
        };
        let binaries = [bin("coordinator"), bin("expert-node")];
        let root = tempfile::tempdir().expect("temp dir");
        let rootfs = root.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("tmp")).expect("rootfs/tmp");
        set_mode(&rootfs.join("tmp"), 0o1777);
        for lib in shared_libraries(&binaries) {
            let dest = rootfs.join(lib.strip_prefix("/").expect("ldd gives absolute paths"));
            std::fs::create_dir_all(dest.parent().expect("parent")).expect("lib dir");
            // Follows symbolic links: the loader path ldd names is often one.
            std::fs::copy(&lib, &dest).unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
        }
        let tar = root.path().join("rootfs.tar");
        let rootfs_arg = rootfs.to_string_lossy().into_owned();
        must(
            "tar",
            &["-C", &rootfs_arg, "-cf", &tar.to_string_lossy(), "."],
            Duration::from_secs(60),
        );
        must(
            "docker",
            &["import", &tar.to_string_lossy(), &images.base],
            Duration::from_secs(60),
        );

        // A small build context holding only what the prebuilt stage copies (hard links where
        // possible: the debug binaries are large).
        let context = root.path().join("context");
        let prebuilt = context.join("deploy/prebuilt");
        std::fs::create_dir_all(&prebuilt).expect("context");
        for exe in &binaries {
            let dest = prebuilt.join(exe.file_name().expect("file name"));
            if std::fs::hard_link(exe, &dest).is_err() {
                std::fs::copy(exe, &dest).expect("copy binary");
            }
        }
        let model = context.join("coordinator/demo-model");
        std::fs::create_dir_all(&model).expect("context model");
        for entry in std::fs::read_dir(repo_root().join("coordinator/demo-model")).expect("model") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), model.join(entry.file_name())).expect("copy model");
        }
        let dockerfile = repo_root().join("deploy/Dockerfile");
        let started = Instant::now();
        must(
            "docker",
            &[
                "build",
                "-q",
                "-f",
                &dockerfile.to_string_lossy(),
                "--target",
                "prebuilt",
                "--build-arg",
                &format!("BASE_IMAGE={}", images.base),
                "-t",
                &images.image,
                &context.to_string_lossy(),
            ],
            Duration::from_secs(300),
        );
        let config = must(
            "docker",
            &[
                "image",
                "inspect",
                "-f",
                "{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Cmd}}",
                &images.image,
            ],
            Duration::from_secs(30),
        );
        assert_eq!(
            config.trim(),
            r#"10001:10001 ["coordinator"] ["serve","--listen","0.0.0.0:8000"]"#,
            "the image runs `coordinator serve` as a non-root user"
        );
        eprintln!(
            "containers: built {} on {} in {:.1} s",
            images.image,
            images.base,
            started.elapsed().as_secs_f64()
        );
        images
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let mut cmd = Command::new("docker");
        cmd.args(["rmi", "-f", &self.image, &self.base]);
        let _ = run_with(cmd, Duration::from_secs(60));
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Makes a test's temporary directory and files readable by the containers' user (uid 10001).
pub fn share_with_containers(dir: &Path) {
    set_mode(dir, 0o755);
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            set_mode(&path, 0o644);
        }
    }
}

/// The shared libraries `ldd` lists for the binaries (absolute paths; the vDSO left out).
fn shared_libraries(binaries: &[PathBuf]) -> Vec<PathBuf> {
    let mut libs = Vec::new();
    for exe in binaries {
        let text = must("ldd", &[&exe.to_string_lossy()], Duration::from_secs(30));
        for line in text.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line
                .split_whitespace()
                .find(|word| word.starts_with('/'))
                .map(PathBuf::from);
            if let Some(path) = path.filter(|p| !libs.contains(p)) {
                libs.push(path);
            }
        }
    }
    assert!(!libs.is_empty(), "ldd listed no libraries for {binaries:?}");
    libs
}

/// A compose project started from deploy/compose.yaml (plus overrides); `docker-compose down -v`
/// when dropped, with the services' last log lines printed if the test is failing.
pub struct Compose {
    pub project: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
}

impl Compose {
    /// `docker-compose up -d` (which waits for the nodes' health checks before starting the
    /// coordinator), bounded by `limit`.
    pub fn up(files: Vec<PathBuf>, env: Vec<(String, String)>, limit: Duration) -> Self {
        let compose = Self {
            project: unique("omnishardtest"),
            files,
            env,
        };
        let started = Instant::now();
        let out = compose.run(&["up", "-d", "--no-build"], limit);
        assert!(out.ok, "docker-compose up failed:\n{}", out.text());
        eprintln!(
            "containers: compose project {} up in {:.1} s",
            compose.project,
            started.elapsed().as_secs_f64()
        );
        compose
    }

    /// `docker-compose -p PROJECT -f FILE... ARGS...` within `limit` (an error is an `Output`
    /// that is not ok, so that teardown can go on).
    pub fn run(&self, args: &[&str], limit: Duration) -> Output {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["-p", &self.project]);
        for file in &self.files {
            cmd.arg("-f").arg(file);
        }
        cmd.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        run_with(cmd, limit).unwrap_or_else(|e| Output {
            ok: false,
            stdout: String::new(),
            stderr: e,
        })
    }

    /// The id of a service's container.
    pub fn container(&self, service: &str) -> String {
        let out = self.run(&["ps", "-q", service], Duration::from_secs(30));
        let id = out.stdout.trim().to_string();
        assert!(
            out.ok && !id.is_empty(),
            "no container for {service}: {}",
            out.text()
        );
        id
    }

    /// The host address the coordinator's port 8000 is published on.
    pub fn api_address(&self) -> String {
        let out = self.run(&["port", "coordinator", "8000"], Duration::from_secs(30));
        assert!(out.ok, "docker-compose port failed: {}", out.text());
        out.stdout.trim().to_string()
    }

    /// `docker run --rm IMAGE-ARGS...` as one more container on the project's network `network`,
    /// bounded by `limit` and removed by name afterwards even if it outlived its client.
    pub fn run_beside(&self, network: &str, args: &[&str], limit: Duration) -> Output {
        let name = unique(&format!("{}-extra", self.project));
        let mut cmd = Command::new("docker");
        cmd.args([
            "run",
            "--rm",
            "--name",
            &name,
            "--network",
            &self.network(network),
        ])
        .args(args);
        let out = run_with(cmd, limit).unwrap_or_else(|e| Output {
            ok: false,
            stdout: String::new(),
            stderr: e,
        });
        let mut rm = Command::new("docker");
        rm.args(["rm", "-f", &name]);
        let _ = run_with(rm, Duration::from_secs(60));
        out
    }

    /// The full name of one of the project's networks (compose v1: `PROJECT_NAME`).
    pub fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.run(
                &["logs", "--no-color", "--tail", "25"],
                Duration::from_secs(60),
            );
            eprintln!(
                "containers: last log lines of {}:\n{}",
                self.project,
                logs.text()
            );
        }
        let out = self.run(
            &["down", "-v", "--remove-orphans", "-t", "10"],
            Duration::from_secs(180),
        );
        if !out.ok {
            eprintln!("containers: docker-compose down failed: {}", out.text());
        }
    }
}
