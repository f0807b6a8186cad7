//! `cargo xtask fuzz-xent N`: the candle-xent fuzz test (crates/candle-xent/tests/fuzz.rs) with
//! N random calls instead of CI's 20,000: every public entry point, dtype, rank, option, empty
//! and strided views and extreme logits, each against an f64 evaluation of PyTorch's formulas.

use crate::workspace_root;
use anyhow::{bail, Context, Result};
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Number of random calls.
    #[arg(default_value_t = 200_000)]
    cases: u64,
    /// First seed (the default is the test's own, so `N` = 20000 repeats CI's run).
    #[arg(long)]
    seed: Option<u64>,
    /// Re-run the one case with this seed (printed beside each failure).
    #[arg(long)]
    only: Option<u64>,
}

pub fn run(a: Args) -> Result<()> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args([
            "test",
            "-p",
            "candle-xent",
            "--test",
            "fuzz",
            "--",
            "--nocapture",
        ])
        .env("XENT_FUZZ_CASES", a.cases.to_string())
        .env("RUST_BACKTRACE", "0");
    if let Some(s) = a.seed {
        cmd.env("XENT_FUZZ_SEED", s.to_string());
    }
    if let Some(s) = a.only {
        cmd.env("XENT_FUZZ_ONLY", s.to_string())
            .env("XENT_FUZZ_CASES", "1")
            .env("XENT_FUZZ_DEBUG", "1");
    }
    let status = cmd.status().context("cannot run cargo test")?;
    if !status.success() {
        bail!("fuzz-xent: some calls failed (see the lines above)");
    }
    Ok(())
}
