use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;

fn config(path: &Path, rank: usize, world: usize, slot_elems: usize) -> ShmCommConfig {
    ShmCommConfig {
        path: path.to_path_buf(),
        rank,
        world_size: world,
        slot_elems,
        timeout: Duration::from_secs(20),
    }
}

/// Runs `f(comm)` on `world` threads, each a rank with its own mapping; returns their results
/// in rank order.
pub(crate) fn on_ranks<T: Send + 'static>(
    world: usize,
    slot_elems: usize,
    f: impl Fn(ShmComm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("group");
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (f, cfg) = (f.clone(), config(&path, rank, world, slot_elems));
            std::thread::spawn(move || f(ShmComm::join(&cfg).expect("join")))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

/// Rank `rank`'s deterministic test values.
fn values(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + rank * 13) % 17) as f32 * 0.25 - 2.0 + rank as f32 * 1e-3)
        .collect()
}

#[test]
fn collectives_agree_with_a_sequential_reference() {
    for world in [2, 3, 4] {
        // 7 values per slot: every collective below takes several rounds, and 300 of them in a
        // row exercise the alternation of slot sets.
        let results = on_ranks(world, 7, move |c| {
            let mut outputs = Vec::new();
            for iter in 0..100 {
                let n = 1 + (iter * 5) % 40;
                let mut v = values(c.rank() + iter, n);
                c.all_reduce_sum(&mut v).expect("all_reduce");
                outputs.push(v);
                let mut g = vec![0f32; n * world];
                c.all_gather(&values(c.rank(), n), &mut g).expect("gather");
                outputs.push(g);
                let root = iter % world;
                let mut b = values(c.rank() * 100 + iter, n);
                c.broadcast(&mut b, root).expect("broadcast");
                outputs.push(b);
            }
            c.barrier().expect("barrier");
            outputs
        });
        for iter in 0..100 {
            let n = 1 + (iter * 5) % 40;
            let mut sum = values(iter, n);
            for r in 1..world {
                for (s, v) in sum.iter_mut().zip(values(r + iter, n)) {
                    *s += v;
                }
            }
            let gathered: Vec<f32> = (0..world).flat_map(|r| values(r, n)).collect();
            let root = iter % world;
            let broadcast = values(root * 100 + iter, n);
            for (rank, out) in results.iter().enumerate() {
                // Bitwise: every rank sums in rank order.
                assert_eq!(out[3 * iter], sum, "world {world} rank {rank} iter {iter}");
                assert_eq!(out[3 * iter + 1], gathered, "gather, world {world}");
                assert_eq!(out[3 * iter + 2], broadcast, "broadcast, world {world}");
            }
        }
    }
}

#[test]
fn sums_are_taken_in_rank_order() {
    // (1e8 + 1) - 1e8 = 0 in f32, while 1e8 + (1 - 1e8) = 8: only one order is right.
    let results = on_ranks(3, 16, |c| {
        let mut v = vec![[1e8f32, 1.0, -1e8][c.rank()]];
        c.all_reduce_sum(&mut v).expect("reduce");
        v[0]
    });
    assert_eq!(results, vec![(1e8f32 + 1.0) - 1e8; 3]);
}

#[test]
fn a_missing_rank_times_out_and_poisons_the_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("group");
    // Nobody else joins.
    let mut cfg = config(&path, 0, 2, 8);
    cfg.timeout = Duration::from_millis(200);
    let err = ShmComm::join(&cfg).expect_err("alone");
    assert!(
        matches!(err, CommError::Timeout { op: "join", .. }),
        "{err}"
    );

    // Both join; rank 1 then stops taking part.
    let path = dir.path().join("group2");
    let (p0, p1) = (path.clone(), path.clone());
    let r1 = std::thread::spawn(move || {
        let mut cfg = config(&p1, 1, 2, 8);
        cfg.timeout = Duration::from_millis(300);
        ShmComm::join(&cfg).expect("join 1")
    });
    let mut cfg = config(&p0, 0, 2, 8);
    cfg.timeout = Duration::from_millis(300);
    let c0 = ShmComm::join(&cfg).expect("join 0");
    let c1 = r1.join().expect("rank 1");
    let err = c0.all_reduce_sum(&mut [1.0]).expect_err("rank 1 is absent");
    assert!(
        matches!(
            err,
            CommError::Timeout {
                rank: 0,
                op: "all_reduce_sum",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("timed out"), "{err}");
    // From now on every rank fails at once.
    for c in [&c0, &c1] {
        let err = c.barrier().expect_err("poisoned");
        assert!(matches!(err, CommError::Poisoned { .. }), "{err}");
    }
}

#[test]
fn bad_shapes_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (rank, world, slots) in [(2, 2, 8), (0, 0, 8), (0, 2, 0)] {
        let err =
            ShmComm::join(&config(&dir.path().join("x"), rank, world, slots)).expect_err("invalid");
        assert!(matches!(err, CommError::Size(_)), "{err}");
    }
    // Two ranks that disagree on the group's size.
    let path = dir.path().join("mismatch");
    let p = path.clone();
    let other = std::thread::spawn(move || {
        let mut cfg = config(&p, 1, 2, 8);
        cfg.timeout = Duration::from_millis(300);
        ShmComm::join(&cfg)
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut cfg = config(&path, 0, 3, 8);
    cfg.timeout = Duration::from_millis(300);
    let mine = ShmComm::join(&cfg);
    let theirs = other.join().expect("thread");
    let errors: Vec<String> = [mine.err(), theirs.err()]
        .into_iter()
        .flatten()
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("expects")),
        "a shape mismatch must be reported: {errors:?}"
    );
}

#[test]
fn rank_zero_removes_the_file_once_all_joined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("group");
    let p = path.clone();
    let r1 = std::thread::spawn(move || ShmComm::join(&config(&p, 1, 2, 8)).expect("join 1"));
    let c0 = ShmComm::join(&config(&path, 0, 2, 8)).expect("join 0");
    let c1 = r1.join().expect("rank 1");
    assert!(!path.exists(), "the file outlived the join");
    // The mappings still work.
    let out = std::thread::spawn(move || {
        let mut v = vec![2.0f32];
        c1.all_reduce_sum(&mut v).expect("reduce 1");
        v
    });
    let mut v = vec![1.0f32];
    c0.all_reduce_sum(&mut v).expect("reduce 0");
    assert_eq!(v, [3.0]);
    assert_eq!(out.join().expect("rank 1"), [3.0]);
}

/// Marker that turns [`child_rank`] from a no-op into rank 1 of [`ranks_in_two_processes`].
const CHILD_MARKER: &str = "MEDLEY_TEST_SHM_CHILD";

/// Rank 1 of [`ranks_in_two_processes`], in a child process of this test binary.
#[test]
fn child_rank() {
    let Some(path) = std::env::var_os(CHILD_MARKER) else {
        return;
    };
    let c = ShmComm::join(&config(Path::new(&path), 1, 2, 1000)).expect("child join");
    let mut v = values(1, 10_000);
    c.all_reduce_sum(&mut v).expect("child reduce");
    let mut check = vec![v.iter().sum::<f32>()];
    c.broadcast(&mut check, 0).expect("child broadcast");
    assert_eq!(check[0], v.iter().sum::<f32>(), "ranks disagree");
}

#[test]
fn ranks_in_two_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("group");
    let exe = std::env::current_exe().expect("test binary");
    let child = std::process::Command::new(exe)
        .args(["--exact", "comm::shm::tests::child_rank", "--nocapture"])
        .env(CHILD_MARKER, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn rank 1");
    let c = ShmComm::join(&config(&path, 0, 2, 1000)).expect("join");
    let mut v = values(0, 10_000);
    c.all_reduce_sum(&mut v).expect("reduce");
    let expected: Vec<f32> = values(0, 10_000)
        .iter()
        .zip(values(1, 10_000))
        .map(|(a, b)| a + b)
        .collect();
    assert_eq!(v, expected);
    let mut check = vec![v.iter().sum::<f32>()];
    c.broadcast(&mut check, 0).expect("broadcast");
    let out = child.wait_with_output().expect("rank 1 exit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "rank 1 failed:\n{stdout}");
    assert!(stdout.contains("1 passed"), "rank 1 did not run:\n{stdout}");
}

/// Marker that turns [`child_joins_then_exits`] into rank 1 of [`a_dead_peer_is_noticed_fast`].
const EXIT_MARKER: &str = "MEDLEY_TEST_SHM_EXIT";

#[test]
fn child_joins_then_exits() {
    let Some(path) = std::env::var_os(EXIT_MARKER) else {
        return;
    };
    let _c = ShmComm::join(&config(Path::new(&path), 1, 2, 8)).expect("child join");
    // Leaves without taking part in anything (as if killed).
    std::process::exit(0);
}

/// Rank 1 of a group of two at `path`, in a child process that joins and exits at once.
fn rank1_that_exits(path: &Path) -> std::process::Child {
    let exe = std::env::current_exe().expect("test binary");
    std::process::Command::new(exe)
        .args(["--exact", "comm::shm::tests::child_joins_then_exits"])
        .env(EXIT_MARKER, path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn rank 1")
}

#[test]
fn a_dead_peer_is_noticed_fast() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("group");
    let mut child = rank1_that_exits(&path);
    let c = ShmComm::join(&config(&path, 0, 2, 8)).expect("join");
    child.wait().expect("rank 1 exits");
    let t0 = std::time::Instant::now();
    let err = c.all_reduce_sum(&mut [1.0]).expect_err("rank 1 is gone");
    assert!(
        matches!(
            err,
            CommError::PeerGone {
                rank: 0,
                peer: 1,
                ..
            }
        ),
        "{err}"
    );
    // The timeout is 20 s; the pid check answers within a futex sleep.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(matches!(c.barrier(), Err(CommError::Poisoned { .. })));
    assert!(matches!(c.check(), Err(CommError::Poisoned { .. })));
}

#[test]
fn check_notices_a_dead_peer_without_a_collective() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("group");
    let mut child = rank1_that_exits(&path);
    let c = ShmComm::join(&config(&path, 0, 2, 8)).expect("join");
    child.wait().expect("rank 1 exits");
    let err = c.check().expect_err("rank 1 is gone");
    assert!(matches!(err, CommError::PeerGone { peer: 1, .. }), "{err}");
    // The group is marked failed for every rank from then on.
    assert!(matches!(c.check(), Err(CommError::Poisoned { .. })));
    assert!(crate::comm::Single.check().is_ok());
}

#[test]
fn tensors_reduce_through_the_host_path() {
    let results = on_ranks(2, 5, |c| {
        let t = candle_core::Tensor::new(
            &[[1.5f32 + c.rank() as f32, 2.0], [3.0, -4.0]],
            &candle_core::Device::Cpu,
        )
        .and_then(|t| t.to_dtype(candle_core::DType::BF16))
        .expect("tensor");
        let r = c.all_reduce_sum_tensor(&t).expect("reduce");
        assert_eq!(r.dtype(), candle_core::DType::BF16);
        r.to_dtype(candle_core::DType::F32)
            .and_then(|r| r.to_vec2::<f32>())
            .expect("values")
    });
    for r in results {
        assert_eq!(r, [[4.0, 4.0], [6.0, -8.0]]);
    }
}
