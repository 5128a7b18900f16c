//! The sweeper: closes and forgets sockets that connected but never authenticated. API Gateway
//! would keep them open until its 10-minute idle timeout, each with a row; the local gateway
//! closes them itself after its auth deadline. On AWS a scheduled function (`ws-sweep`, every
//! minute) runs this, so such a socket lives at most the deadline and a minute.

use std::time::Duration;

use futures::StreamExt;

use super::Edge;
use crate::Error;
use crate::config::{ConfigError, Lookup, routes};
use crate::db::{Scope, connections};
use crate::secrets::Secrets;

/// Sockets closed at once.
const CONCURRENCY: usize = 8;
/// Rows taken per pass; a larger backlog is taken by the following passes of the same run.
const BATCH: i64 = 500;

/// Forgets every socket unauthenticated past `deadline` and closes it; how many.
pub async fn sweep(edge: &Edge, deadline: Duration) -> Result<usize, Error> {
    let mut swept = 0;
    loop {
        // Forgotten first: one that authenticates meanwhile finds no row and is refused, so
        // no socket is closed after it was let in.
        let mut tx = edge.db.begin(Scope::Unauthenticated).await?;
        let stale = connections::forget_unauthenticated(&mut tx, deadline, BATCH).await?;
        tx.commit().await?;
        let taken = stale.len();
        futures::stream::iter(stale)
            .for_each_concurrent(CONCURRENCY, |socket| async move {
                if let Err(err) = edge
                    .delivery
                    .close(&socket.endpoint, &socket.connection_id)
                    .await
                {
                    tracing::warn!(
                        connection_id = socket.connection_id.as_str(),
                        error = &err as &dyn std::error::Error,
                        "could not close an unauthenticated socket"
                    );
                }
            })
            .await;
        swept += taken;
        if taken < BATCH as usize {
            break;
        }
    }
    if swept > 0 {
        tracing::info!(swept, "closed sockets that never authenticated");
    }
    Ok(swept)
}

/// `ws-sweep`'s state: the edge, and how long a socket may stay unauthenticated.
pub struct Sweeper {
    pub edge: Edge,
    pub deadline: Duration,
}

impl Sweeper {
    pub async fn load(
        lookup: impl Lookup,
        aws: &aws_config::SdkConfig,
        secrets: &Secrets,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            edge: Edge::load(&lookup, aws, secrets).await?,
            deadline: routes::auth_deadline(&lookup)?,
        })
    }
}

/// Runs the sweeper as a Lambda function on its schedule until the runtime stops it.
pub async fn run(sweeper: Sweeper) -> Result<(), lambda_runtime::Error> {
    let (edge, deadline) = (&sweeper.edge, sweeper.deadline);
    lambda_runtime::run(lambda_runtime::service_fn(
        move |_: lambda_runtime::LambdaEvent<serde_json::Value>| async move {
            let swept = sweep(edge, deadline).await;
            crate::telemetry::flush();
            swept
                .map(|swept| serde_json::json!({ "swept": swept }))
                .map_err(lambda_runtime::Error::from)
        },
    ))
    .await
}
