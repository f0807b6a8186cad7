//! The example program as a user runs it: it trains, prints its progress, and its loss settles
//! just above the floor that label smoothing puts under cross-entropy (the entropy of the
//! smoothed target; no model can go below it).

use std::process::Command;

/// The number after `key` in `line`.
fn number_after(line: &str, key: &str) -> f64 {
    let rest = &line[line.find(key).expect(key) + key.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|w| w.trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in {line:?}"))
}

#[test]
fn the_example_trains_down_to_the_smoothing_floor_and_not_below() {
    let out = Command::new(env!("CARGO_BIN_EXE_label_smoothing"))
        .output()
        .expect("the example binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step")).collect();
    assert!(steps.len() >= 2, "no progress lines:\n{stdout}");
    let (first, last) = (steps[0], steps[steps.len() - 1]);
    let floor_line = stdout
        .lines()
        .find(|l| l.starts_with("loss floor"))
        .unwrap_or_else(|| panic!("no floor line:\n{stdout}"));
    let floor = number_after(floor_line, ":");
    // 4 classes, eps 0.1: target 0.925 on the true class, 0.025 on each other one; the floor
    // is that target's entropy, computed here independently of the example.
    let expected_floor = -(0.925f64 * 0.925f64.ln() + 3.0 * 0.025 * 0.025f64.ln());
    assert!((floor - expected_floor).abs() < 1e-4, "{floor_line}");
    let (loss0, loss) = (number_after(first, "loss"), number_after(last, "loss"));
    assert!(loss < loss0, "the loss did not fall: {first} -> {last}");
    assert!(loss >= floor - 1e-3, "below the floor {floor}: {last}");
    assert!(
        loss < floor + 0.05,
        "did not settle near the floor {floor}: {last}"
    );
    assert_eq!(number_after(last, "accuracy"), 100.0, "{last}");
}
