//! The deployment files agree with the binaries (fast, no Docker, no cluster): every `--flag` in
//! the commands, arguments and health checks of deploy/compose.yaml, deploy/compose.tls.yaml and
//! the Kubernetes manifests under deploy/k8s/ exists in the `--help` of the binary (and
//! subcommand) that runs it, and so does every OMNISHARD_* variable set for it; shard specs I/N
//! cover 0..N-1 with one N (and the StatefulSet's replicas are N); the ports nodes listen on are
//! those the coordinator dials, containers declare and probes ask; and paths given to the
//! binaries lie under a mounted volume.

#[path = "deploy_manifests/support.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use support::*;

fn check_compose(over: Option<&str>) {
    let file = over.unwrap_or("compose.yaml");
    let services = compose_merged(over);
    let mut node_addresses = BTreeSet::new();
    let mut shards = Vec::new();
    let mut coordinator = None;
    for (name, service) in &services {
        let context = format!("{file}: service {name}");
        let mut argv = strings(&service["entrypoint"]);
        argv.extend(strings(&service["command"]));
        check_argv(&context, &argv);
        let env = compose_env(service);
        check_env(&context, &argv, env.keys());
        let mounts: Vec<String> = strings(&service["volumes"])
            .iter()
            .map(|v| mount_target(&context, v))
            .collect();
        for key in [
            "OMNISHARD_MODEL",
            "OMNISHARD_TLS_CERT",
            "OMNISHARD_TLS_KEY",
            "OMNISHARD_TLS_CA",
        ] {
            if let Some(path) = env.get(key) {
                check_mounted(&context, path, &mounts);
            }
        }
        let check = strings(&service["healthcheck"]["test"]);
        assert_eq!(
            check.first().map(String::as_str),
            Some("CMD"),
            "{context}: health check must run a command"
        );
        check_argv(&format!("{context} health check"), &check[1..]);
        for flag in ["--tls-cert", "--tls-key", "--tls-ca"] {
            if let Some(path) = flag_value(&check, flag) {
                check_mounted(&context, path, &mounts);
            }
        }
        let listen =
            flag_value(&argv, "--listen").unwrap_or_else(|| panic!("{context}: no --listen"));
        match argv[0].as_str() {
            "expert-node" => {
                shards.push(
                    flag_value(&argv, "--shard")
                        .or(env.get("OMNISHARD_SHARD").map(String::as_str))
                        .expect("shard")
                        .to_string(),
                );
                let probed = flag_value(&check, "--node").expect("node health check dials --node");
                assert_eq!(port(probed), port(listen), "{context}: health check port");
                let tls = env.contains_key("OMNISHARD_TLS_CERT");
                assert_eq!(
                    probed.starts_with("https://"),
                    tls,
                    "{context}: health check scheme"
                );
                let scheme = if tls { "https://" } else { "" };
                node_addresses.insert(format!("{scheme}{name}:{}", port(listen)));
            }
            _ => {
                assert_eq!(argv[1], "serve", "{context}");
                let probed =
                    flag_value(&check, "--url").expect("coordinator health check asks --url");
                assert!(
                    probed.ends_with("/health"),
                    "{context}: health check {probed}"
                );
                assert_eq!(port(probed), port(listen), "{context}: health check port");
                for published in strings(&service["ports"]) {
                    assert_eq!(
                        port(&published),
                        port(listen),
                        "{context}: published port {published}"
                    );
                }
                coordinator = Some(env);
            }
        }
    }
    let env = coordinator.unwrap_or_else(|| panic!("{file}: no coordinator service"));
    let dialed: BTreeSet<String> = env["OMNISHARD_NODES"]
        .split(',')
        .map(str::to_string)
        .collect();
    assert_eq!(
        dialed, node_addresses,
        "{file}: the coordinator's OMNISHARD_NODES and the node services"
    );
    let (n, copies) = check_shards(file, &shards);
    assert!(
        copies.iter().all(|&c| c >= 2),
        "{file}: every shard on two nodes at least: {shards:?}"
    );
    eprintln!(
        "{file}: {} nodes, {n} shards, copies {copies:?}",
        shards.len()
    );
    let example =
        std::fs::read_to_string(deploy_dir().join("omnishard.env.example")).expect("env example");
    let keys: Vec<String> = example
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .collect();
    check_env(
        "omnishard.env.example",
        &["coordinator".into(), "serve".into()],
        &keys,
    );
}

#[test]
fn compose_files_match_the_binaries() {
    check_compose(None);
    check_compose(Some("compose.tls.yaml"));
}

#[test]
fn kubernetes_manifests_match_the_binaries() {
    let k8s = deploy_dir().join("k8s");
    let kustomization = load(&k8s.join("kustomization.yaml")).remove(0);
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(&k8s).expect("deploy/k8s") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            files.insert(name);
        }
    }
    let mut docs: Vec<Value> = files.iter().flat_map(|f| load(&k8s.join(f))).collect();
    assert_eq!(
        files, listed,
        "kustomization.yaml must list every manifest of deploy/k8s"
    );
    let component = k8s.join("components/replicas");
    let replicas = load(&component.join("kustomization.yaml")).remove(0);
    for file in strings(&replicas["resources"]) {
        docs.extend(load(&component.join(file)));
    }
    let mut config_maps = BTreeMap::new();
    for doc in &docs {
        if doc["kind"] == "ConfigMap" {
            config_maps.insert(
                doc["metadata"]["name"].as_str().expect("name").to_string(),
                doc["data"].clone(),
            );
        }
    }
    let mut expected_nodes = Vec::new();
    let mut node_list = None;
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or("");
        if kind != "StatefulSet" && kind != "Deployment" {
            continue;
        }
        let name = doc["metadata"]["name"].as_str().expect("name");
        let pod = &doc["spec"]["template"]["spec"];
        let mounts: Vec<String> = pod["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .flat_map(|c| c["volumeMounts"].as_array().cloned().unwrap_or_default())
            .map(|m| m["mountPath"].as_str().expect("mountPath").to_string())
            .collect();
        for container in pod["containers"].as_array().expect("containers") {
            let context = format!("{kind} {name}");
            let mut argv = strings(&container["command"]);
            argv.extend(strings(&container["args"]));
            check_argv(&context, &argv);
            let mut env: BTreeMap<String, String> = container["env"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|e| {
                    (
                        e["name"].as_str().expect("env name").to_string(),
                        e["value"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            for from in container["envFrom"].as_array().cloned().unwrap_or_default() {
                let map = from["configMapRef"]["name"]
                    .as_str()
                    .expect("envFrom a ConfigMap");
                let data = config_maps
                    .get(map)
                    .unwrap_or_else(|| panic!("{context}: no ConfigMap {map}"));
                for (k, v) in data.as_object().expect("data") {
                    env.insert(k.clone(), v.as_str().expect("string data").to_string());
                }
            }
            check_env(&context, &argv, env.keys());
            for key in [
                "OMNISHARD_MODEL",
                "OMNISHARD_TLS_CERT",
                "OMNISHARD_TLS_KEY",
                "OMNISHARD_TLS_CA",
            ] {
                if let Some(path) = env.get(key) {
                    check_mounted(&context, path, &mounts);
                }
            }
            let listen = port(flag_value(&argv, "--listen").expect("--listen"));
            let ports: BTreeMap<String, u16> = container["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or("").to_string(),
                        p["containerPort"].as_u64().expect("containerPort") as u16,
                    )
                })
                .collect();
            assert!(
                ports.values().any(|&p| p == listen),
                "{context}: containerPort for --listen {listen}"
            );
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let probe = &container[probe];
                assert!(
                    probe.is_object(),
                    "{context}: every container needs startup, readiness and liveness probes"
                );
                if let Some(command) = probe["exec"]["command"].as_array() {
                    let command = strings(&Value::Array(command.clone()));
                    check_argv(&format!("{context} probe"), &command);
                    let node = flag_value(&command, "--node").expect("exec probe asks --node");
                    assert_eq!(port(node), listen, "{context}: probe port");
                    for flag in ["--tls-cert", "--tls-key", "--tls-ca"] {
                        if let Some(path) = flag_value(&command, flag) {
                            check_mounted(&context, path, &mounts);
                        }
                    }
                } else {
                    let target = &probe["httpGet"]["port"];
                    let target = target
                        .as_u64()
                        .map(|p| p as u16)
                        .or_else(|| target.as_str().and_then(|n| ports.get(n).copied()));
                    assert_eq!(target, Some(listen), "{context}: probe port");
                }
            }
            if argv[0] == "expert-node" {
                let replicas = doc["spec"]["replicas"].as_u64().expect("replicas") as usize;
                let shard = env.get("OMNISHARD_SHARD").expect("OMNISHARD_SHARD");
                let index = container["env"]
                    .as_array()
                    .expect("env")
                    .iter()
                    .find(|e| e["name"] == "POD_INDEX");
                let field = index.map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]);
                assert_eq!(
                    field.and_then(Value::as_str),
                    Some("metadata.labels['apps.kubernetes.io/pod-index']"),
                    "{context}: POD_INDEX"
                );
                let n = shard
                    .strip_prefix("$(POD_INDEX)/")
                    .expect("shard from the pod index");
                let specs: Vec<String> = (0..replicas).map(|i| format!("{i}/{n}")).collect();
                check_shards(&context, &specs);
                assert_eq!(
                    doc["spec"]["serviceName"], "experts",
                    "{context}: serviceName"
                );
                for i in 0..replicas {
                    expected_nodes.push(format!("https://{name}-{i}.experts:{listen}"));
                }
            } else {
                node_list = env.get("OMNISHARD_NODES").cloned();
                assert!(
                    container["resources"]["limits"]["nvidia.com/gpu"].is_string()
                        || container["resources"]["limits"]["nvidia.com/gpu"].is_number(),
                    "{context}: a GPU"
                );
                assert!(
                    pod["nodeSelector"].is_object(),
                    "{context}: a GPU node selector"
                );
            }
            assert!(
                container["resources"]["requests"].is_object(),
                "{context}: resource requests"
            );
        }
    }
    let services: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"] == "experts")
        .expect("Service experts");
    assert_eq!(
        headless["spec"]["clusterIP"], "None",
        "the experts Service is headless"
    );
    let patch = replicas["patches"][0]["patch"]
        .as_str()
        .expect("replicas patch");
    let patched = load_str(patch);
    let with_replicas = patched[0][0]["value"]
        .as_str()
        .expect("patched OMNISHARD_NODES");
    let listed: Vec<&str> = node_list
        .as_deref()
        .expect("coordinator OMNISHARD_NODES")
        .split(',')
        .collect();
    let all: Vec<&str> = with_replicas.split(',').collect();
    let base: Vec<&String> = expected_nodes
        .iter()
        .filter(|a| !a.contains("experts-r-"))
        .collect();
    assert_eq!(
        listed, base,
        "configmap.yaml's OMNISHARD_NODES and the StatefulSet's pods"
    );
    assert_eq!(
        all, expected_nodes,
        "the replicas component's OMNISHARD_NODES and both StatefulSets' pods"
    );
}
