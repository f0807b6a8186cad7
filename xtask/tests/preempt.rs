//! Preemptible runs, as a job scheduler treats them: `cargo xtask train` stopped by SIGTERM
//! (a recovery checkpoint, a clean exit) and killed by SIGKILL at random moments, each time
//! followed by `--resume`, ends with the model of an uninterrupted run, byte for byte.

use candle_finetune::smoke::{dataset_repo_files, weights_repo_files, RepoSpec};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn write_files(dir: &Path, files: Vec<(String, Vec<u8>)>) {
    for (p, b) in files {
        let f = dir.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b).unwrap();
    }
}

fn train(data: &Path, weights: &Path, out: &Path, resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(["train", "--data-dir"])
        .arg(data)
        .arg("--weights-file")
        .arg(weights)
        .args([
            "--epochs",
            "3",
            "--image-size",
            "16",
            "--batch-size",
            "16",
            "--lr",
            "0.01",
            "--checkpoint-every-steps",
            "2",
            "--out",
        ])
        .arg(out)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if resume {
        c.arg("--resume");
    }
    c
}

fn step_of(out: &Path) -> Option<u64> {
    candle_finetune::train::Checkpoint::load(&out.join("checkpoint-last.safetensors"))
        .ok()
        .map(|c| c.meta.step)
}

fn wait(mut child: Child, limit: Duration) -> (bool, String) {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.success(), err);
        }
        if t0.elapsed() > limit {
            child.kill().unwrap();
            panic!("the run did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_and_sigkill_at_random_moments_then_resume_give_the_uninterrupted_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_files(
        &data,
        dataset_repo_files(&RepoSpec {
            train_shards: 2,
            train_per_shard: 60,
            validation: 12,
            test: 12,
            scale: 1,
            rows_per_group: 16,
        })
        .unwrap(),
    );
    let wdir = dir.path().join("weights");
    write_files(&wdir, weights_repo_files(224).unwrap());
    let weights: PathBuf = wdir.join("model.safetensors");

    let reference = dir.path().join("reference");
    let (ok, log) = wait(
        train(&data, &weights, &reference, false).spawn().unwrap(),
        Duration::from_secs(600),
    );
    assert!(ok, "{log}");
    let total = step_of(&reference).unwrap();
    assert_eq!(total, 24, "3 epochs of 8 steps");

    let out = dir.path().join("preempted");
    // SIGTERM once a recovery checkpoint exists: a checkpoint at the next step, exit 0.
    let child = train(&data, &weights, &out, true).spawn().unwrap();
    let t0 = Instant::now();
    while step_of(&out).is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let sent = Instant::now();
    let (ok, log) = wait(child, Duration::from_secs(120));
    assert!(ok, "SIGTERM must end the run cleanly: {log}");
    assert!(log.contains("--resume"), "{log}");
    eprintln!("SIGTERM: exited {:?} after the signal", sent.elapsed());
    let after_term = step_of(&out).unwrap();

    // SIGKILL at pseudo-random moments; resume each time until the run completes.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut kills = Vec::new();
    let mut done = false;
    for _ in 0..40 {
        let before = step_of(&out).unwrap_or(0);
        let mut child = train(&data, &weights, &out, true).spawn().unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(1500 + seed % 2500);
        let t0 = Instant::now();
        let mut finished = None;
        while t0.elapsed() < delay {
            if let Some(s) = child.try_wait().unwrap() {
                finished = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match finished {
            Some(s) => {
                assert!(s.success(), "a resumed run failed");
                done = true;
                break;
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills.push((before, step_of(&out).unwrap_or(0)));
            }
        }
    }
    assert!(
        done,
        "the run did not complete after 40 resumptions: {kills:?}"
    );
    eprintln!("after SIGTERM at step {after_term}: SIGKILLs (checkpointed step before -> after): {kills:?}");
    assert_eq!(step_of(&out), Some(total));
    for f in ["model.safetensors", "checkpoint-last.safetensors"] {
        let a = candle_finetune::train::Checkpoint::load(
            &reference.join("checkpoint-last.safetensors"),
        )
        .unwrap();
        let b = candle_finetune::train::Checkpoint::load(&out.join("checkpoint-last.safetensors"))
            .unwrap();
        assert_eq!(a.meta.step, b.meta.step, "{f}");
    }
    assert_eq!(
        std::fs::read(reference.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap(),
        "the chosen model of the preempted run is the uninterrupted run's, byte for byte"
    );
    let losses = |d: &Path| -> Vec<f64> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(losses(&reference), losses(&out), "epoch mean losses");
}
