//! `soak`: the randomized soak (`tests::soak`) for as long as asked.
//!
//!   soak [--minutes M] [--seed S] [--aws]   default: 10 minutes, a seed from the clock
//!                                           (printed), the local runtime
//!
//! Needs what `infra/local/soak.sh` sets up (it runs this): Postgres's tools for
//! `infra/local/services.sh`, `redis-server`, Chromium and `NODE_PATH` with playwright-core,
//! and `KONSTRUCT_LOCAL_BIN`.

use std::time::Duration;

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let minutes: f64 = value("--minutes")
        .map(|m| m.parse())
        .transpose()
        .context("--minutes takes a number")?
        .unwrap_or(10.0);
    let seed = tests::soak::seed_or_clock(value("--seed").map(String::as_str))?;
    println!("soak: seed {seed} ({minutes} minutes; replay it with --seed {seed})");
    let settings = tests::soak::Settings {
        duration: Duration::from_secs_f64(minutes * 60.0),
        seed,
        bin: std::env::var("KONSTRUCT_LOCAL_BIN").context("KONSTRUCT_LOCAL_BIN is not set")?,
        aws: args.iter().any(|a| a == "--aws"),
    };
    let outcome = tests::soak::run(&settings).await?;
    println!(
        "soak: passed, seed {seed}: every tab equals the database ({} messages); faults {:?}; actions {}",
        outcome.messages, outcome.faults, outcome.actions
    );
    Ok(())
}
