//! Helpers of tests/tests/deploy_manifests.rs: the deploy files read as JSON values (YAML through
//! yaml-rust2, merge keys applied), compose overrides merged as docker-compose merges them, the
//! options and variables of the binaries' `--help`, and the checks shared by compose and
//! Kubernetes (flags, variables, shard specs, ports, mounted paths).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use omnishard_tests::{bin, tests_dir};
use serde_json::{Map, Value};

pub fn deploy_dir() -> PathBuf {
    tests_dir().join("../deploy")
}

/// Every YAML document of a file, as JSON values (aliases expanded, `<<` merge keys applied).
pub fn load(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_rust2::YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .iter()
        .map(to_json)
        .filter(|v| !v.is_null())
        .collect()
}

pub fn to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::String(s) | Yaml::Real(s) => Value::String(s.clone()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(hash) => {
            let mut map = Map::new();
            let mut merged = Map::new();
            for (k, v) in hash {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                if key == "<<" {
                    let sources = match to_json(v) {
                        Value::Array(all) => all,
                        one => vec![one],
                    };
                    for source in sources.into_iter().rev() {
                        let Value::Object(source) = source else {
                            panic!("`<<` merges a mapping, not {source}")
                        };
                        merged.extend(source);
                    }
                } else {
                    map.insert(key, to_json(v));
                }
            }
            // Keys written in the mapping win over merged ones.
            for (k, v) in merged {
                map.entry(k).or_insert(v);
            }
            Value::Object(map)
        }
        Yaml::Null | Yaml::BadValue | Yaml::Alias(_) => Value::Null,
    }
}

pub fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect(),
        Value::Null => Some(Vec::new()),
        other => panic!("expected a list of strings, got {other}"),
    }
    .unwrap_or_else(|| panic!("expected a list of strings, got {v}"))
}

/// The options and environment variables a command's `--help` lists.
pub struct Cli {
    pub what: String,
    pub flags: BTreeSet<String>,
    pub envs: BTreeSet<String>,
}

/// `--help` of `argv[0]` (coordinator or expert-node) and, for the coordinator, the subcommand
/// `argv[1]`, read once per test run.
pub fn cli(argv: &[String]) -> &'static Cli {
    static CACHE: Mutex<BTreeMap<String, &'static Cli>> = Mutex::new(BTreeMap::new());
    let mut words: Vec<&str> = vec![argv.first().map(String::as_str).unwrap_or("")];
    match words[0] {
        "coordinator" => words.push(argv.get(1).map(String::as_str).unwrap_or("")),
        "expert-node" => {}
        other => panic!("{argv:?}: a container runs `{other}`, not coordinator or expert-node"),
    }
    let what = words.join(" ");
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache.entry(what.clone()).or_insert_with(|| {
        let out = std::process::Command::new(bin(words[0]))
            .args(&words[1..])
            .arg("--help")
            .output()
            .expect("run --help");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "`{what} --help` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut flags = BTreeSet::new();
        for line in text.lines() {
            let line = line.trim_start();
            let line = line
                .split_once(", ")
                .filter(|_| line.starts_with('-') && !line.starts_with("--"))
                .map_or(line, |(_, rest)| rest);
            if let Some(rest) = line.strip_prefix("--") {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                flags.insert(format!("--{name}"));
            }
        }
        let envs = text
            .split("[env: ")
            .skip(1)
            .map(|rest| {
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect()
            })
            .collect();
        Box::leak(Box::new(Cli { what, flags, envs }))
    })
}

/// Checks one command line: every `--flag` is an option of the binary that runs it.
pub fn check_argv(context: &str, argv: &[String]) {
    let cli = cli(argv);
    for arg in argv.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(
            cli.flags.contains(flag),
            "{context}: `{}` has no {flag} (it has {:?})",
            cli.what,
            cli.flags
        );
    }
}

/// Checks the OMNISHARD_* variables set for a container whose main command is `argv`.
pub fn check_env<'a>(context: &str, argv: &[String], names: impl IntoIterator<Item = &'a String>) {
    let cli = cli(argv);
    for name in names.into_iter().filter(|n| n.starts_with("OMNISHARD_")) {
        assert!(
            cli.envs.contains(name),
            "{context}: `{}` reads no {name} (it reads {:?})",
            cli.what,
            cli.envs
        );
    }
}

/// The value after `flag` in a command line.
pub fn flag_value<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    argv.iter()
        .position(|a| a == flag)
        .and_then(|i| argv.get(i + 1))
        .map(String::as_str)
}

/// The port of `host:port`, `https://host:port` or `http://host:port/path`.
pub fn port(address: &str) -> u16 {
    let rest = address.split("://").last().unwrap_or(address);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let port = hostport.rsplit(':').next().unwrap_or("");
    port.parse()
        .unwrap_or_else(|_| panic!("no port in {address:?}"))
}

/// Shard specs `I/N` (one per node): one N, and every shard 0..N-1 held; the nodes per shard.
pub fn check_shards(context: &str, specs: &[String]) -> (usize, Vec<usize>) {
    assert!(!specs.is_empty(), "{context}: no shard specs");
    let parsed: Vec<(usize, usize)> = specs
        .iter()
        .map(|s| {
            let (i, n) = s
                .split_once('/')
                .unwrap_or_else(|| panic!("{context}: shard {s:?} is not I/N"));
            (
                i.parse().expect("shard index"),
                n.parse().expect("shard count"),
            )
        })
        .collect();
    let n = parsed[0].1;
    let mut copies = vec![0; n];
    for &(i, of) in &parsed {
        assert_eq!(of, n, "{context}: shard specs disagree on N: {specs:?}");
        assert!(i < n, "{context}: shard {i}/{n} out of range");
        copies[i] += 1;
    }
    assert!(
        copies.iter().all(|&c| c > 0),
        "{context}: shards not held by any node: {specs:?}"
    );
    (n, copies)
}

/// The keys of a compose `environment` (a mapping or a list of `KEY=VALUE`).
pub fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map_or(v.to_string(), str::to_string)))
            .collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|kv| {
                kv.split_once('=')
                    .map_or((kv.to_string(), String::new()), |(k, v)| {
                        (k.into(), v.into())
                    })
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// compose.yaml with an override applied as docker-compose does for the keys these files use:
/// mappings (environment, healthcheck) merged, volumes added, everything else replaced.
pub fn compose_merged(over: Option<&str>) -> Map<String, Value> {
    let base = load(&deploy_dir().join("compose.yaml")).remove(0);
    let mut services = base["services"].as_object().expect("services").clone();
    if let Some(file) = over {
        let over = load(&deploy_dir().join(file)).remove(0);
        for (name, patch) in over["services"].as_object().expect("services") {
            let service = services
                .get_mut(name)
                .unwrap_or_else(|| panic!("{file}: no service {name} in compose.yaml"));
            let service = service.as_object_mut().expect("service");
            for (key, value) in patch.as_object().expect("service patch") {
                match (service.get_mut(key), value) {
                    (Some(Value::Object(old)), Value::Object(new)) => old.extend(new.clone()),
                    (Some(Value::Array(old)), Value::Array(new)) if key == "volumes" => {
                        old.extend(new.clone())
                    }
                    _ => {
                        service.insert(key.clone(), value.clone());
                    }
                }
            }
        }
    }
    services
}

/// The container path of a compose volume `SOURCE:TARGET[:MODE]` (SOURCE may hold `${VAR:-x}`).
pub fn mount_target(context: &str, volume: &str) -> String {
    let mut plain = String::new();
    let mut rest = volume;
    while let Some(start) = rest.find("${") {
        plain.push_str(&rest[..start]);
        plain.push('X');
        let end = rest[start..]
            .find('}')
            .unwrap_or_else(|| panic!("{context}: {volume}"));
        rest = &rest[start + end + 1..];
    }
    plain.push_str(rest);
    let target = plain.split(':').nth(1);
    target
        .unwrap_or_else(|| panic!("{context}: volume {volume}"))
        .to_string()
}

/// A path given to a binary must lie under one of the container's mount points.
pub fn check_mounted(context: &str, path: &str, mounts: &[String]) {
    assert!(
        mounts.iter().any(|m| Path::new(path).starts_with(m)),
        "{context}: {path} is on no mounted volume ({mounts:?})"
    );
}

pub fn load_str(text: &str) -> Vec<Value> {
    yaml_rust2::YamlLoader::load_from_str(text)
        .expect("yaml")
        .iter()
        .map(to_json)
        .collect()
}
