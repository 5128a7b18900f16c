//! The sweeper: closes and forgets sockets that connected but never authenticated. API Gateway
//! would keep them open until its 10-minute idle timeout, each with a row; the local gateway
//! closes them itself after its auth deadline. On AWS a scheduled function (`ws-sweep`, every
//! minute) runs this, so such a socket lives at most the deadline and a minute.
//!
//! It also ends replies left `streaming` by a producer that is gone (a crash no retry
//! follows): one that nobody has written for longer than a job can run ends `failed`, with
//! what it had, and the conversation's sockets get its `response` (invariant 9).

use std::time::Duration;

use futures::StreamExt;

use super::Edge;
use crate::Error;
use crate::config::{ConfigError, Lookup, routes};
use crate::db::{Scope, connections, message_path};
use crate::delivery::{Audience, ConnectionsFanout};
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

/// Ends every reply still `streaming` that nobody has written for `stale_after`, and tells
/// its conversation's sockets; how many.
pub async fn end_stale_replies(edge: &Edge, stale_after: Duration) -> Result<usize, Error> {
    let before = chrono::Utc::now()
        - chrono::Duration::from_std(stale_after)
            .map_err(|_| Error::Internal("stale_after is out of range".into()))?;
    let mut tx = edge.db.begin(Scope::Unauthenticated).await?;
    let stale = message_path::stale_replies(&mut tx, before, BATCH).await?;
    tx.commit().await?;
    let fanout = ConnectionsFanout::new(edge.db.clone(), edge.delivery.clone());
    let mut ended = 0;
    for reply in stale {
        let mut audience = Audience::new(reply.tenant_id, reply.conversation_id, Vec::new());
        // Ended only if still unwritten: a producer that wrote meanwhile keeps it.
        let failed = crate::orchestrator::end_failed(
            &edge.db,
            &fanout,
            &mut audience,
            reply.reply_to,
            reply.id,
            Some(before),
        );
        if failed.await? {
            ended += 1;
            tracing::warn!(conversation_id = %reply.conversation_id, reply_to = %reply.reply_to, "a reply whose producer is gone ended failed");
        }
    }
    Ok(ended)
}

/// `ws-sweep`'s state: the edge, how long a socket may stay unauthenticated, and how long a
/// streaming reply may go unwritten before its producer counts as gone.
pub struct Sweeper {
    pub edge: Edge,
    pub deadline: Duration,
    pub stale_after: Duration,
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
            // Longer than the orchestrator's timeout, which no producer outlives.
            stale_after: Duration::from_secs(crate::config::defaulted(
                &lookup,
                "REPLY_STALE_SECONDS",
            )?),
        })
    }
}

/// Runs the sweeper as a Lambda function on its schedule until the runtime stops it.
pub async fn run(sweeper: Sweeper) -> Result<(), lambda_runtime::Error> {
    let (edge, deadline, stale_after) = (&sweeper.edge, sweeper.deadline, sweeper.stale_after);
    crate::lambda::serve(
        move |_: lambda_runtime::LambdaEvent<serde_json::Value>| async move {
            let swept = sweep(edge, deadline).await;
            let ended = end_stale_replies(edge, stale_after).await;
            Ok(serde_json::json!({
                "swept": swept?,
                "stale_replies_ended": ended?,
            }))
        },
    )
    .await
}
