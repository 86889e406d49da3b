//! The lane between threads of one process: answers, sleeping and waking, abandoned slots,
//! closing from either end, and the files a node refuses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ANSWER_CAPACITY, LaneClient, LaneError, LaneServer, REQUEST_CAPACITY, SLOTS};

/// A node thread answering each request with its bytes reversed.
fn echo(client: &LaneClient, spin: Duration) -> (std::thread::JoinHandle<()>, super::LaneCloser) {
    let server = LaneServer::open(client.path().to_str().expect("utf-8")).expect("opens");
    let closer = server.closer();
    let thread = std::thread::spawn(move || {
        server.serve(
            spin,
            |req, cap| {
                assert_eq!(cap, ANSWER_CAPACITY);
                req.iter().rev().copied().collect()
            },
            || false,
        )
    });
    (thread, closer)
}

fn answer(posted: &mut super::Posted) -> Result<Vec<u8>, LaneError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(a) = posted.try_take() {
            return a;
        }
        assert!(Instant::now() < deadline, "no answer");
        posted.sleep(Duration::from_millis(1));
    }
}

#[test]
fn requests_are_answered_awake_and_after_sleeping() {
    let client = Arc::new(LaneClient::create().expect("a lane"));
    let (thread, _closer) = echo(&client, Duration::from_micros(50));
    client.unlink();
    assert!(!client.path().exists(), "the name goes once mapped");
    for round in 0..3u8 {
        let mut posted = client.post(&[1, 2, round]).expect("a slot");
        assert_eq!(answer(&mut posted).expect("answered"), [round, 2, 1]);
        // Long enough for the node thread to fall asleep on the doorbell.
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every slot at once.
    let mut posted: Vec<_> = (0..SLOTS as u8)
        .map(|i| client.post(&[i; 3]).expect("a slot"))
        .collect();
    assert!(client.post(&[9]).is_none(), "all slots busy");
    for (i, p) in posted.iter_mut().enumerate() {
        assert_eq!(answer(p).expect("answered"), [i as u8; 3]);
    }
    client.close();
    thread
        .join()
        .expect("the node thread ends when the lane closes");
}

#[test]
fn an_abandoned_slot_is_reused_once_answered_and_oversize_requests_are_refused() {
    let client = Arc::new(LaneClient::create().expect("a lane"));
    assert!(client.post(&vec![0; REQUEST_CAPACITY + 1]).is_none());
    // No node yet: every slot posted and given up.
    for _ in 0..SLOTS {
        drop(client.post(&[1]).expect("a slot"));
    }
    assert!(
        client.post(&[1]).is_none(),
        "abandoned slots wait for their answers"
    );
    let (thread, closer) = echo(&client, Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut posted = loop {
        if let Some(p) = client.post(&[7, 8]) {
            break p;
        }
        assert!(Instant::now() < deadline, "abandoned slots never came back");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(answer(&mut posted).expect("answered"), [8, 7]);
    closer.close();
    thread.join().expect("ends");
    assert!(client.post(&[1]).is_none(), "a closed lane takes no calls");
}

#[test]
fn a_node_that_stops_closes_the_lane_between_calls() {
    let client = Arc::new(LaneClient::create().expect("a lane"));
    let server = LaneServer::open(client.path().to_str().expect("utf-8")).expect("opens");
    let served = std::sync::atomic::AtomicUsize::new(0);
    let mut posted = client.post(&[3]).expect("a slot");
    std::thread::scope(|s| {
        s.spawn(|| {
            server.serve(
                Duration::from_millis(1),
                |req, _| {
                    served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    req.to_vec()
                },
                || served.load(std::sync::atomic::Ordering::SeqCst) > 0,
            )
        });
        // The call already posted is answered; then the lane closes.
        assert_eq!(answer(&mut posted).expect("answered"), [3]);
    });
    assert!(client.is_closed());
    assert!(client.post(&[4]).is_none());
}

#[test]
fn closing_fails_a_waiting_call_at_once() {
    let client = Arc::new(LaneClient::create().expect("a lane"));
    let mut waiting = client.post(&[1]).expect("a slot");
    assert!(waiting.try_take().is_none(), "no node: no answer yet");
    let closing = client.clone();
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        closing.close();
    });
    let started = Instant::now();
    assert!(matches!(answer(&mut waiting), Err(LaneError::Closed)));
    assert!(started.elapsed() < Duration::from_secs(5));
    closer.join().expect("closed");
}

#[test]
fn a_lane_is_served_once() {
    let client = LaneClient::create().expect("a lane");
    let path = client.path().to_str().expect("utf-8");
    let _first = LaneServer::open(path).expect("opens");
    let Err(second) = LaneServer::open(path) else {
        panic!("a second server was let in")
    };
    assert!(second.to_string().contains("serves it already"), "{second}");
}

#[test]
fn only_lane_files_are_opened() {
    for path in [
        "/etc/passwd",
        "/dev/shm/other",
        "/dev/shm/omnishard-lane-../x",
    ] {
        let err = LaneServer::open(path).err().expect("refused");
        assert!(err.to_string().contains(path), "{err}");
    }
    let dir = std::path::Path::new("/dev/shm");
    let link = dir.join(format!("omnishard-lane-test-link-{}", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/hostname", &link).expect("a link");
    let refused = LaneServer::open(link.to_str().expect("utf-8"));
    std::fs::remove_file(&link).expect("removed");
    assert!(refused.is_err(), "a link is not followed");
    let short = dir.join(format!("omnishard-lane-test-short-{}", std::process::id()));
    std::fs::write(&short, b"OSLANE01").expect("written");
    let refused = LaneServer::open(short.to_str().expect("utf-8"));
    std::fs::remove_file(&short).expect("removed");
    assert!(
        refused
            .err()
            .expect("refused")
            .to_string()
            .contains("bytes where a lane"),
    );
}
