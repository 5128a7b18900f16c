//! The migration function: a CloudFormation custom resource (`Migrations` in `template.yaml`)
//! that applies the migrations embedded in the binary, as the migrator role, on every deploy
//! that changes them and before the functions that need the schema are updated.
//!
//! Whatever happens, CloudFormation hears of it: a custom resource that never answers holds
//! the stack for an hour. So a configuration problem (a secret that cannot be read) is reported
//! as a failure of the event rather than of the start, and the migrations run under a deadline
//! that leaves time to answer. `Delete` undoes nothing: the schema outlives the stack.

use std::collections::HashMap;
use std::time::Duration;

use aws_lambda_events::event::cloudformation::{
    CloudFormationCustomResourceRequest as Request,
    CloudFormationCustomResourceResponse as Response,
    CloudFormationCustomResourceResponseStatus as Status,
};
use backon::{ExponentialBuilder, Retryable};

use crate::Error;
use crate::config::{ConfigError, DatabaseConfig, Lookup};
use crate::db::{Db, MIGRATOR};
use crate::secrets::Secrets;

/// The one physical resource the custom resource stands for: the schema.
pub const PHYSICAL_ID: &str = "konstruct-schema";

/// Time kept back from the invocation's deadline to answer CloudFormation.
const ANSWER_TIME: Duration = Duration::from_secs(10);

/// What the function needs: the migrator's connection, or why it could not be had.
pub struct MigrateState {
    pub database: Result<DatabaseConfig, ConfigError>,
    pub http: reqwest::Client,
}

impl MigrateState {
    /// The function's state. A configuration problem is kept, to be reported to
    /// CloudFormation with the event rather than by failing to start (which would leave the
    /// stack waiting for an answer).
    pub async fn load(lookup: impl Lookup, secrets: &Secrets) -> Self {
        Self::new(DatabaseConfig::load_migrator(lookup, secrets).await)
    }

    pub fn new(database: Result<DatabaseConfig, ConfigError>) -> Self {
        Self {
            database,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("the HTTP client builds with its default TLS"),
        }
    }
}

/// Where and how to answer one request: the fields every request kind carries, and the id of
/// the resource.
struct Reply {
    response_url: String,
    response: Response,
}

impl Reply {
    fn new(
        response_url: String,
        stack_id: String,
        request_id: String,
        logical_resource_id: String,
        physical_resource_id: String,
    ) -> Self {
        let mut response = Response::default();
        response.stack_id = stack_id;
        response.request_id = request_id;
        response.logical_resource_id = logical_resource_id;
        response.physical_resource_id = physical_resource_id;
        Self {
            response_url,
            response,
        }
    }
}

/// Handles one event: migrates (Create, Update) or does nothing (Delete), then answers at the
/// request's response URL. An error is returned only when the answer could not be delivered.
pub async fn handle(
    state: &MigrateState,
    request: Request,
    time_left: Duration,
) -> Result<(), Error> {
    let (mut reply, migrate) = match request {
        Request::Create(r) => (
            Reply::new(
                r.response_url,
                r.stack_id,
                r.request_id,
                r.logical_resource_id,
                PHYSICAL_ID.to_owned(),
            ),
            true,
        ),
        Request::Update(r) => (
            Reply::new(
                r.response_url,
                r.stack_id,
                r.request_id,
                r.logical_resource_id,
                r.physical_resource_id,
            ),
            true,
        ),
        Request::Delete(r) => (
            Reply::new(
                r.response_url,
                r.stack_id,
                r.request_id,
                r.logical_resource_id,
                r.physical_resource_id,
            ),
            false,
        ),
        _ => {
            return Err(Error::BadRequest(
                "unknown custom resource request type".into(),
            ));
        }
    };
    let outcome = if migrate {
        let budget = time_left.saturating_sub(ANSWER_TIME);
        match tokio::time::timeout(budget, apply(state)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!(
                "migrations did not finish within {} s; the next deploy continues them",
                budget.as_secs()
            )),
        }
    } else {
        tracing::info!("stack deleted: the schema stays");
        Ok(HashMap::new())
    };
    match outcome {
        Ok(data) => {
            reply.response.status = Status::Success;
            reply.response.data = data;
        }
        Err(reason) => {
            tracing::error!(%reason, "migrations failed");
            reply.response.status = Status::Failed;
            reply.response.reason = Some(reason);
        }
    }
    answer(&state.http, &reply.response_url, &reply.response).await
}

/// Applies pending migrations; the latest applied version, for the stack's outputs.
async fn apply(state: &MigrateState) -> Result<HashMap<String, String>, String> {
    let config = state.database.as_ref().map_err(ToString::to_string)?;
    let db = Db::connect_lazy(config);
    db.migrate().await.map_err(|e| e.to_string())?;
    let version: i64 = crate::checked!(
        query_scalar,
        "select coalesce(max(version), 0) from _sqlx_migrations where success"
    )
    .fetch_one(db.pool())
    .await
    .map_err(|e| e.to_string())?;
    db.pool().close().await;
    tracing::info!(
        version,
        known = MIGRATOR.iter().count(),
        "migrations applied"
    );
    Ok(HashMap::from([(
        "SchemaVersion".to_owned(),
        version.to_string(),
    )]))
}

/// PUTs the answer to the pre-signed URL, retrying briefly. The URL is signed without a content
/// type, so none is sent.
async fn answer(http: &reqwest::Client, url: &str, response: &Response) -> Result<(), Error> {
    let body = serde_json::to_vec(response).map_err(|e| Error::Internal(e.to_string()))?;
    let put = || async {
        http.put(url)
            .header(reqwest::header::CONTENT_TYPE, "")
            .body(body.clone())
            .send()
            .await?
            .error_for_status()
            .map(drop)
    };
    put.retry(ExponentialBuilder::default().with_max_times(3))
        .await
        .map_err(|e| Error::Internal(format!("cannot answer CloudFormation: {e}")))
}

/// Runs the function until the runtime stops it.
pub async fn run(state: MigrateState) -> Result<(), lambda_runtime::Error> {
    let state = &state;
    crate::lambda::serve(
        move |event: lambda_runtime::LambdaEvent<Request>| async move {
            let deadline = std::time::UNIX_EPOCH + Duration::from_millis(event.context.deadline);
            let time_left = deadline
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::from_secs(60));
            Ok(handle(state, event.payload, time_left).await?)
        },
    )
    .await
}
