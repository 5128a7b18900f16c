//! `konstruct-local`'s development commands as a developer runs them: `seed-demo` seeds once
//! however often it runs, and neither it nor `token` works against a deployed configuration.

use std::process::Stdio;
use std::str::FromStr;

use shared::db::{Scope, conversations};
use shared::domain::{ConversationId, Role, TenantId, UserId};
use tokio::process::Command;

use crate::helpers::{SECRET, TestDb, verifier};

/// `seed-demo --shell` as `make dev` reads it: `name='value'` lines.
async fn seed_demo(test: &TestDb) -> Vec<(String, String)> {
    let output = Command::new(std::env::var("KONSTRUCT_LOCAL_BIN").unwrap())
        .args(["seed-demo", "--shell"])
        .env("KONSTRUCT_MODE", "local")
        .env("PORTAL_JWT_SECRET", SECRET)
        .env("DATABASE_URL", &test.url)
        .env("MIGRATOR_DATABASE_URL", &test.migrator_url)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| {
            let (name, value) = line.split_once('=').expect("name='value'");
            let value = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\''));
            (name.to_owned(), value.expect("a quoted value").to_owned())
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    &fields.iter().find(|(n, _)| n == name).expect(name).1
}

#[tokio::test]
async fn seed_demo_seeds_once_and_its_token_opens_its_conversation() {
    let (test, db) = TestDb::migrated().await;
    let first = seed_demo(&test).await;
    let again = seed_demo(&test).await;
    for name in ["tenant_id", "user_id", "agent_id", "conversation_id"] {
        assert_eq!(field(&first, name), field(&again, name), "{name}");
    }

    let tenant = TenantId::from_str(field(&first, "tenant_id")).unwrap();
    let user = UserId::from_str(field(&first, "user_id")).unwrap();
    let conversation = ConversationId::from_str(field(&first, "conversation_id")).unwrap();
    let caller = verifier().verify(field(&again, "token")).unwrap();
    assert_eq!(caller.user_id(), user);
    assert_eq!(caller.role(), Role::CustomerAdmin);
    assert!(
        field(&first, "url").contains(&format!("conversation={conversation}")),
        "{first:?}"
    );

    let mut tx = db.begin(Scope::Tenant(tenant)).await.unwrap();
    let row = conversations::find(&mut tx, conversation)
        .await
        .unwrap()
        .expect("the conversation is in the demo tenant");
    assert_eq!(row.user_id, user);
    let rows: i64 = sqlx::query_scalar("select count(*) from web_conversations")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(rows, 1, "seeded once");
}

/// `token` and `seed-demo` are for development: a deployed configuration (`KONSTRUCT_MODE=aws`,
/// however spaced or cased) is refused before anything is done.
#[tokio::test]
async fn development_commands_refuse_a_deployed_configuration() {
    let bin = std::env::var("KONSTRUCT_LOCAL_BIN").unwrap();
    let user = uuid::Uuid::new_v4().to_string();
    for mode in ["aws", " aws ", "AWS"] {
        for args in [vec!["token", "--user", user.as_str()], vec!["seed-demo"]] {
            let output = Command::new(&bin)
                .args(&args)
                .env("KONSTRUCT_MODE", mode)
                .env("PORTAL_JWT_SECRET", SECRET)
                .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
                .stdin(Stdio::null())
                .output()
                .await
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{args:?} ran with {mode:?}");
            assert!(
                stderr.contains("refusing") && stderr.contains("KONSTRUCT_MODE=aws"),
                "{args:?} with {mode:?}: {stderr}"
            );
            assert!(output.stdout.is_empty(), "nothing minted or seeded");
        }
    }
}
