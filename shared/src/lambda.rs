//! The one Lambda adapter: every function but `chat-api` (an HTTP API, served by `lambda_http`
//! through `api::flushing_metrics`) runs its invocations through [`serve`].

use std::future::Future;

use lambda_runtime::LambdaEvent;
use lambda_runtime::streaming::Body;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Runs this function until the runtime stops it: each invocation's event through `handler`,
/// then the metrics the invocation recorded flushed (one EMF line to the log) before the answer
/// goes back. An `Err` is the invocation's failure, as Lambda reports it.
pub async fn serve<E, R, F, Fut>(handler: F) -> Result<(), lambda_runtime::Error>
where
    E: DeserializeOwned,
    R: Serialize,
    F: Fn(LambdaEvent<E>) -> Fut,
    Fut: Future<Output = Result<R, lambda_runtime::Error>>,
{
    let handler = &handler;
    lambda_runtime::run::<E, _, R, R, Body, _, _>(lambda_runtime::service_fn(
        move |event: LambdaEvent<E>| async move {
            // Boxed: a route's or a job's nested futures are deep enough to exhaust the
            // compiler's layout recursion in release builds.
            let answered = Box::pin(handler(event)).await;
            crate::telemetry::flush();
            answered
        },
    ))
    .await
}
