//! Two minutes of the randomized soak (`tests::soak`; `make soak` runs it for ten): four tabs
//! of the chat page in headless Chromium over two conversations, sends, double sends, sends
//! while offline, reloads, tabs closed and reopened, cancels, tokens let expire and renewed,
//! the worker killed and Redis, Postgres and the gateway restarted; at the end every tab shows
//! exactly what the database holds, and every stored message is answered.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_minutes_of_people_networks_and_faults_leave_every_tab_equal_to_the_database() {
    soak(false).await;
}

/// The same on the AWS-shaped stack (the function binaries under the Lambda emulator, the
/// orchestrator on the FIFO event source, PgBouncer, round trips on every hop), with the gateway
/// killed and restarted as its fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_minutes_on_the_aws_path_leave_every_tab_equal_to_the_database() {
    soak(true).await;
}

async fn soak(aws: bool) {
    let seed = tests::soak::seed_or_clock(std::env::var("SOAK_SEED").ok().as_deref())
        .expect("SOAK_SEED is a number");
    println!("soak seed {seed} (SOAK_SEED={seed} replays it)");
    let settings = tests::soak::Settings {
        duration: Duration::from_secs(120),
        seed,
        bin: std::env::var("KONSTRUCT_LOCAL_BIN").expect(
            "KONSTRUCT_LOCAL_BIN is not set: run the tests through `make test`, which builds it",
        ),
        aws,
    };
    let outcome = tests::soak::run(&settings)
        .await
        .unwrap_or_else(|e| panic!("soak with seed {seed}: {e:#}"));
    println!("{outcome:?}");
    assert!(
        outcome.messages > 20,
        "the schedule sent too little: {outcome:?}"
    );
}
