//! The MPI collectives across 2 ranks (`mpirun -np 2` on the `ddp-selftest` binary), and a rank
//! that dies taking the whole job down with its name and a non-zero status, in bounded time.
//! Needs `mpirun` (Open MPI or MPICH) on the PATH; CI installs Debian's openmpi-bin.
#![cfg(feature = "mpi")]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `mpirun -np 2 ddp-selftest ARGS`, killed after `limit`.
fn mpirun(args: &[&str], limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    let mut child = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(env!("CARGO_BIN_EXE_ddp-selftest"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun on the PATH (apt install openmpi-bin)");
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            panic!("mpirun still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), t0.elapsed())
}

#[test]
fn collectives_are_exact_on_two_ranks() {
    let (out, _) = mpirun(&[], Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for r in 0..2 {
        assert!(
            stdout.contains(&format!("ddp-selftest: rank {r} of 2: ok")),
            "{stdout}"
        );
    }
}

#[test]
fn a_dead_rank_ends_the_job_with_its_name() {
    let (out, took) = mpirun(&["--die-rank", "1"], Duration::from_secs(60));
    assert!(!out.status.success(), "the job must fail");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("rank 1 exits"), "{all}");
    assert!(
        !all.contains("rank 0 of 2: ok"),
        "rank 0 must not finish: {all}"
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
}
