//! `GET /dashboard` in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
//! installs when missing; this test is skipped, saying so, where there is none) loads the page
//! from a running cluster after some traffic, runs its script against `/v1/stats`, and the
//! rendered page is checked: the model named, both nodes up, one heatmap cell per (layer,
//! expert) with counts that are not all the same; and a screenshot is taken.

use std::path::PathBuf;
use std::process::Command;

use omnishard_tests::Server;
use serde_json::json;

/// A Chromium to drive: `OMNISHARD_CHROMIUM`, else the first of the usual names on PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("OMNISHARD_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

fn headless(browser: &PathBuf, args: &[&str]) -> std::process::Output {
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,800",
            // Lets the page's fetch and first refresh finish before the DOM is read.
            "--virtual-time-budget=5000",
        ])
        .args(args)
        .output()
        .expect("run chromium")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_the_cluster() {
    let Some(browser) = chromium() else {
        eprintln!(
            "SKIPPED: no Chromium found (install Debian's `chromium`, or set OMNISHARD_CHROMIUM)"
        );
        return;
    };
    let server = Server::start(&["cluster", "--nodes", "2", "serve"]);
    for prompt in [
        "The lighthouse keeper",
        "When a storm broke the cable",
        "Many small experts",
    ] {
        let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0});
        let (status, answer) = server.post_json("/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
    }
    let url = server.url("/dashboard");
    let dom = tokio::task::spawn_blocking({
        let (browser, url) = (browser.clone(), url.clone());
        move || headless(&browser, &["--dump-dom", &url])
    })
    .await
    .unwrap();
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success() && !html.is_empty(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert!(html.contains("demo-model"), "{html}");
    assert_eq!(html.matches("class=\"state-up\"").count(), 2, "{html}");
    let counts: Vec<u64> = html
        .split("data-count=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next()?.parse().ok())
        .collect();
    assert_eq!(
        counts.len(),
        4 * 8,
        "one cell per (layer, expert) of the demo model"
    );
    assert!(counts.iter().sum::<u64>() > 0, "{counts:?}");
    assert!(
        counts.iter().any(|&c| c != counts[0]),
        "a uniform heatmap: {counts:?}"
    );

    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("dashboard.png");
    let arg = format!("--screenshot={}", png.display());
    let out = tokio::task::spawn_blocking(move || headless(&browser, &[&arg, &url]))
        .await
        .unwrap();
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000);
}
