//! Every input a fuzz target ever crashed on (tests/fixtures/fuzz-regressions/<target>/), replayed
//! through the same code as the target; each must now be handled without a panic.

use omnishard_tests::{fixtures_dir, fuzz};

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = fixtures_dir().join("fuzz-regressions").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|f| f == ".gitkeep") {
            continue;
        }
        run(&std::fs::read(&path).unwrap());
        n += 1;
    }
    n
}

#[test]
fn forward_request_crashes_stay_fixed() {
    assert!(replay("forward_request", fuzz::forward_request) >= 1);
}

#[test]
fn http_body_crashes_stay_fixed() {
    replay("http_body", fuzz::http_body);
}

#[test]
fn checkpoint_crashes_stay_fixed() {
    replay("checkpoint", fuzz::checkpoint);
}
