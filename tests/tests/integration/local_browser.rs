//! The chat page and its client module in headless Chromium (playwright-core under Node),
//! against `konstruct-local`: a conversation, and resuming across drops, reloads, tabs, the
//! connection limit and the idle cut.

use std::process::Stdio;
use std::time::Duration;

use shared::db::Scope;
use shared::domain::Role;
use tokio::process::Command;

use crate::helpers::local::{Env, Local};
use crate::helpers::{TestDb, seed, token};

/// Runs a script of `tests/browser/` in Node (headless Chromium through playwright-core) and
/// fails the test with everything it said unless it succeeds.
async fn browser_script(script: &str, args: &[&str]) {
    let node_path = std::env::var("NODE_PATH").expect(
        "NODE_PATH is not set: run the tests through `make test`, which installs playwright-core",
    );
    let output = Command::new("node")
        .arg(format!("{}/browser/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .env("NODE_PATH", node_path)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run node");
    assert!(
        output.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_chat_page_talks_to_the_agent_in_headless_chromium() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let url = format!(
        "http://{}/?conversation={}#token={}",
        local.address,
        s.conversation,
        token(s.user, Role::CustomerOperator)
    );
    let screenshot = std::env::temp_dir().join(format!("chat-page-{}.png", s.conversation));
    browser_script("chat-page.cjs", &[&url, &screenshot.to_string_lossy()]).await;
    assert!(screenshot.exists());
    local.stop().await;
}

/// Regenerate, edit and version navigation on the page (`tests/browser/branches.cjs`), with a
/// second tab and a reload on the same branch.
#[tokio::test]
async fn the_chat_page_regenerates_edits_and_switches_branches_in_headless_chromium() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let url = format!(
        "http://{}/?conversation={}#token={}",
        local.address,
        s.conversation,
        token(s.user, Role::CustomerOperator)
    );
    browser_script("branches.cjs", &[&url]).await;
    local.stop().await;
}

/// Runs `tests/browser/resume.cjs` (in `mode`, if any) against konstruct-local (with these
/// extra `serve` arguments) and a model that streams each reply over about two seconds; returns
/// how many times each user message was stored and answered, by text, in `seq` order.
async fn resume_in_chromium(serve: &[&str], mode: Option<&str>) -> Vec<(String, i64, i64)> {
    use crate::helpers::llm::{FakeLlm, Reply, last_user_text};

    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let llm = FakeLlm::start(|request, _| {
        let words = format!("Streaming answer to: {}.", last_user_text(request));
        let pieces: Vec<String> = words.split_inclusive(' ').map(str::to_owned).collect();
        let gap = Duration::from_millis(2000 / pieces.len().max(1) as u64);
        Reply::Stream(pieces, gap)
    })
    .await;
    let conversation = crate::helpers::model_conversation(&db, &s).await;
    let env = Env::new(&test);
    let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(serve);
    let local = Local::start_with_model(&env, &args, &llm.base_url).await;
    let url = format!(
        "http://{}/?conversation={}#token={}",
        local.address,
        conversation,
        token(s.user, Role::CustomerOperator)
    );
    let mut args = vec![url.as_str()];
    args.extend(mode);
    browser_script("resume.cjs", &args).await;
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let counts = sqlx::query_as(
        "select q.content, count(distinct q.id),
                (select count(*) from web_conversation_messages r where r.reply_to = any(array_agg(q.id)))
         from web_conversation_messages q
         where q.conversation_id = $1 and q.role = 'user'
         group by q.content order by min(q.seq)",
    )
    .bind(conversation)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    local.stop().await;
    counts
}

fn once_each(questions: &[&str]) -> Vec<(String, i64, i64)> {
    questions.iter().map(|q| (q.to_string(), 1, 1)).collect()
}

/// The page and its client module (`/konstruct-chat.js`) across a socket dropped mid-stream, a
/// second tab and a reload mid-stream, a message typed while disconnected, one whose `ack` was
/// lost, and `cancel`: every message and every reply shown exactly once, each stored once.
#[tokio::test]
async fn the_chat_page_resumes_across_drops_reloads_and_tabs_in_headless_chromium() {
    let counts = resume_in_chromium(&[], None).await;
    assert_eq!(
        counts,
        once_each(&[
            "first",
            "second",
            "third",
            "offline",
            "unacknowledged",
            "stop me"
        ]),
        "each stored once, each answered once"
    );
}

/// The same page against a gateway that cuts every socket after 2 s (API Gateway's 2-hour
/// limit, shortened) and any socket quiet for 1 s (its idle timeout): replies stream across
/// the cuts and the page resumes each time.
#[tokio::test]
async fn the_chat_page_resumes_across_the_connection_limit_and_the_idle_cut() {
    let serve = ["--max-connection", "2", "--idle-timeout", "1"];
    let counts = resume_in_chromium(&serve, Some("cuts")).await;
    assert_eq!(
        counts,
        once_each(&["across the cuts", "and again", "once more"])
    );
}
