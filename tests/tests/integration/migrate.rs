//! The migration function as CloudFormation invokes it: custom-resource events (fixtures of
//! Create, Update and Delete) against the test Postgres, answered at a local HTTP server that
//! stands in for the pre-signed response URL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::event::cloudformation::CloudFormationCustomResourceRequest;
use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::put;
use serde_json::Value;
use shared::config::{ConfigError, DatabaseConfig};
use shared::db::{Db, MIGRATOR, Scope};
use shared::domain::TenantId;
use shared::migrate::{self, MigrateState};
use shared::secrets::Secrets;

use crate::helpers::TestDb;

/// One answer: its body, and its content type.
type Answer = (Value, Option<String>);

/// What CloudFormation's response URL received.
#[derive(Clone, Default)]
struct Answers(Arc<Mutex<Vec<Answer>>>);

impl Answers {
    async fn serve() -> (Self, String) {
        let answers = Self::default();
        let recorded = answers.clone();
        let app = Router::new().route(
            "/response",
            put(move |headers: HeaderMap, body: Bytes| {
                let recorded = recorded.clone();
                async move {
                    let content_type = headers
                        .get("content-type")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let body = serde_json::from_slice(&body).expect("the answer is JSON");
                    recorded.0.lock().unwrap().push((body, content_type));
                    ""
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/response", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (answers, url)
    }

    fn last(&self) -> Answer {
        self.0.lock().unwrap().last().cloned().expect("an answer")
    }
}

fn event(kind: &str, response_url: &str) -> CloudFormationCustomResourceRequest {
    let path = format!(
        "{}/fixtures/events/migrate/{kind}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("RESPONSE_URL", response_url);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn migrator_config(url: &str) -> Result<DatabaseConfig, ConfigError> {
    DatabaseConfig::load_migrator(
        |name: &str| (name == "MIGRATOR_DATABASE_URL").then(|| url.to_owned()),
        &Secrets::none(),
    )
    .await
}

async fn tables(test: &TestDb) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_tables where schemaname = 'public' and tablename <> '_sqlx_migrations'",
    )
    .fetch_one(&test.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn create_and_update_migrate_and_delete_keeps_the_schema() {
    let test = TestDb::empty().await;
    let (answers, url) = Answers::serve().await;
    let state = MigrateState::new(migrator_config(&test.migrator_url).await);
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap();

    migrate::handle(&state, event("create", &url), Duration::from_secs(60))
        .await
        .unwrap();
    let (answer, content_type) = answers.last();
    assert_eq!(answer["Status"], "SUCCESS", "{answer}");
    assert_eq!(answer["PhysicalResourceId"], migrate::PHYSICAL_ID);
    assert_eq!(answer["LogicalResourceId"], "Migrations");
    assert_eq!(answer["RequestId"], "9d6c1f6e-3f1a-4c55-9a7e-2b8f2b4f0c11");
    assert!(
        answer["StackId"]
            .as_str()
            .unwrap()
            .contains("konstruct-webchat-dev")
    );
    assert_eq!(answer["Data"]["SchemaVersion"], latest.to_string());
    // The pre-signed URL is signed without a content type: none may be sent.
    assert_eq!(content_type.as_deref(), Some(""));
    assert_eq!(tables(&test).await, 9);
    // The functions' role works on what the migrator made.
    let db = Db::from_pool(test.pool.clone());
    db.begin(Scope::Tenant(TenantId::new()))
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();

    // Every deploy may run it again: nothing to do, and still a success.
    migrate::handle(&state, event("update", &url), Duration::from_secs(60))
        .await
        .unwrap();
    let (answer, _) = answers.last();
    assert_eq!(answer["Status"], "SUCCESS", "{answer}");
    assert_eq!(answer["PhysicalResourceId"], migrate::PHYSICAL_ID);

    migrate::handle(&state, event("delete", &url), Duration::from_secs(60))
        .await
        .unwrap();
    let (answer, _) = answers.last();
    assert_eq!(answer["Status"], "SUCCESS", "{answer}");
    assert_eq!(
        tables(&test).await,
        9,
        "deleting the stack keeps the schema"
    );
}

#[tokio::test]
async fn a_missing_secret_fails_the_deploy_with_its_reason() {
    let (answers, url) = Answers::serve().await;
    let state =
        MigrateState::new(DatabaseConfig::load_migrator(|_: &str| None, &Secrets::none()).await);
    migrate::handle(&state, event("create", &url), Duration::from_secs(60))
        .await
        .unwrap();
    let (answer, _) = answers.last();
    assert_eq!(answer["Status"], "FAILED", "{answer}");
    assert!(
        answer["Reason"]
            .as_str()
            .unwrap()
            .contains("MIGRATOR_DATABASE_URL"),
        "{answer}"
    );
    // A failed Create is followed by CloudFormation's Delete, which must succeed for the
    // rollback to finish.
    migrate::handle(&state, event("delete", &url), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(answers.last().0["Status"], "SUCCESS");
}

#[tokio::test]
async fn a_migration_that_cannot_run_fails_the_deploy() {
    let test = TestDb::empty().await;
    let (answers, url) = Answers::serve().await;
    // The runtime role may not create anything: its migrations fail, and so does the deploy.
    let state = MigrateState::new(migrator_config(&test.url).await);
    migrate::handle(&state, event("update", &url), Duration::from_secs(60))
        .await
        .unwrap();
    let (answer, _) = answers.last();
    assert_eq!(answer["Status"], "FAILED", "{answer}");
    assert!(!answer["Reason"].as_str().unwrap().is_empty());
    assert_eq!(answer["PhysicalResourceId"], migrate::PHYSICAL_ID);
}
