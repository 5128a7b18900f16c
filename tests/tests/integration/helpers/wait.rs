//! Waiting for something a test cannot be told of (a row, a log line, an invocation's end):
//! polled every 20 ms, with a stall detector's wide margin, never a fixed sleep.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// What a check finds: a `bool` that holds, or `Some` value.
pub trait Found {
    type Value;
    fn found(self) -> Option<Self::Value>;
}

impl Found for bool {
    type Value = ();
    fn found(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Found for Option<T> {
    type Value = T;
    fn found(self) -> Option<T> {
        self
    }
}

/// [`within`] 15 s.
pub async fn eventually<R: Found, F: Future<Output = R>>(
    what: &str,
    check: impl FnMut() -> F,
) -> R::Value {
    within(Duration::from_secs(15), what, check).await
}

/// Runs `check` until it finds what it looks for and returns that; fails the test, naming
/// `what`, when `limit` passes first.
pub async fn within<R: Found, F: Future<Output = R>>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> R::Value {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await.found() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
