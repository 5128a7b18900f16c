use shared::Error;
use shared::db::conversations::{self, Conversation};
use shared::db::message_path::Written;
use shared::db::messages::{self, Branch, MessageRole, PageFrom, StopReason};
use shared::db::{Db, Scope};
use shared::domain::{MessageId, MessageText, PageLimit};

use tests::stack::store_history;

use crate::helpers::{Seed, TestDb, seed};

async fn conversation(db: &Db, s: &Seed) -> Conversation {
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    conversations::find(&mut tx, s.conversation)
        .await
        .unwrap()
        .unwrap()
}

fn text(s: &str) -> MessageText {
    MessageText::parse(s).unwrap()
}

/// Stores `n` user messages and returns their ids in the order stored.
async fn store(db: &Db, s: &Seed, n: usize) -> Vec<MessageId> {
    let conversation = conversation(db, s).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
        let stored = store_history(&mut tx, &conversation, &text(&format!("m{i}")))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        ids.push(stored.id);
    }
    ids
}

async fn page(db: &Db, s: &Seed, before: Option<MessageId>, limit: i64) -> Vec<MessageId> {
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    messages::page(
        &mut tx,
        s.conversation,
        Branch::All,
        before.map_or(PageFrom::Newest, PageFrom::Before),
        PageLimit::new(limit).unwrap(),
    )
    .await
    .unwrap()
    .into_iter()
    .map(|m| m.message.id)
    .collect()
}

#[tokio::test]
async fn a_new_message_bumps_the_conversation() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let before = conversation(&db, &s).await.updated_at;
    let ids = store(&db, &s, 1).await;
    let after = conversation(&db, &s).await.updated_at;
    assert!(after > before);
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let stored = messages::page(
        &mut tx,
        s.conversation,
        Branch::All,
        PageFrom::Newest,
        PageLimit::default(),
    )
    .await
    .unwrap();
    assert_eq!(stored[0].message.id, ids[0]);
    assert_eq!(stored[0].message.created_at, after);
}

#[tokio::test]
async fn pagination_is_ascending_with_a_before_cursor_and_respects_limits() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let ids = store(&db, &s, 7).await;

    assert_eq!(page(&db, &s, None, 50).await, ids, "all, oldest first");
    let newest = page(&db, &s, None, 3).await;
    assert_eq!(newest, ids[4..7], "the newest three, ascending");
    let older = page(&db, &s, Some(newest[0]), 3).await;
    assert_eq!(older, ids[1..4], "the three just older than the cursor");
    let oldest = page(&db, &s, Some(older[0]), 3).await;
    assert_eq!(oldest, ids[0..1], "what is left");
    assert!(
        page(&db, &s, Some(ids[0]), 3).await.is_empty(),
        "nothing before the first"
    );
    assert_eq!(page(&db, &s, Some(ids[6]), 1).await, ids[5..6]);
}

#[tokio::test]
async fn messages_written_in_one_transaction_keep_their_order() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let conversation = conversation(&db, &s).await;
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let stored = store_history(&mut tx, &conversation, &text(&format!("m{i}")))
            .await
            .unwrap();
        ids.push(stored.id);
    }
    tx.commit().await.unwrap();
    assert_eq!(page(&db, &s, None, 50).await, ids);
    assert_eq!(page(&db, &s, Some(ids[3]), 2).await, ids[1..3]);
}

#[tokio::test]
async fn a_cursor_from_another_conversation_is_a_bad_request() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let other = seed(&db, "other").await;
    let foreign = store(&db, &other, 1).await[0];
    store(&db, &s, 2).await;
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    for before in [foreign, MessageId::new()] {
        let err = messages::page(
            &mut tx,
            s.conversation,
            Branch::All,
            PageFrom::Before(before),
            PageLimit::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::BadRequest(_)), "{err:?}");
    }
}

#[tokio::test]
async fn a_reply_is_stored_once_per_request() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let conversation = conversation(&db, &s).await;
    let question = store(&db, &s, 1).await[0];
    // The request's reply id: a redelivered job writes the same one.
    let reply_id = MessageId::new();

    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    assert_eq!(
        messages::find(&mut tx, s.conversation, reply_id)
            .await
            .unwrap(),
        None
    );
    tx.commit().await.unwrap();
    let first = tests::stack::store_reply(
        &db,
        &conversation,
        reply_id,
        question,
        "answer",
        StopReason::End,
        None,
    )
    .await
    .unwrap();
    let again = tests::stack::store_reply(
        &db,
        &conversation,
        reply_id,
        question,
        "another answer",
        StopReason::End,
        None,
    )
    .await
    .unwrap();
    assert_eq!(first.written, Written::Created);
    assert_eq!(again.written, Written::Existing);
    assert_eq!(again.reply, first.reply, "the first reply stands");
    assert_eq!(first.reply.role, MessageRole::Assistant);
    assert_eq!(first.reply.reply_to, Some(question));
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    assert_eq!(
        messages::find(&mut tx, s.conversation, reply_id)
            .await
            .unwrap(),
        Some(first.reply.clone())
    );
    tx.commit().await.unwrap();
    let err = tests::stack::store_reply(
        &db,
        &conversation,
        MessageId::new(),
        MessageId::new(),
        "orphan",
        StopReason::End,
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

/// The message path sends its steps as simple queries, arguments written as literals: any text
/// comes back as it was sent, whatever quotes, backslashes or dollar signs it holds.
#[tokio::test]
async fn any_text_survives_a_step_sent_as_literals() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let conversation = conversation(&db, &s).await;
    let texts = [
        r"it's ''quoted'' and \back\slashed\",
        "$$ dollar $$; select 1; -- $tag$ E'x' \\' ');drop table agents;--",
        "line\nbreak\ttab\r\u{1F600} 中文 \u{202E}",
        "\\",
        "'",
    ];
    for (question, text) in store(&db, &s, texts.len()).await.into_iter().zip(texts) {
        let stored = tests::stack::store_reply(
            &db,
            &conversation,
            MessageId::new(),
            question,
            text,
            StopReason::End,
            None,
        )
        .await
        .unwrap();
        assert_eq!(stored.reply.content, text);
    }
}

#[tokio::test]
async fn reset_deletes_the_messages_and_keeps_the_conversation() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let other = seed(&db, "other").await;
    store(&db, &s, 3).await;
    store(&db, &other, 2).await;
    let before = conversation(&db, &s).await;

    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    assert_eq!(messages::reset(&mut tx, s.conversation).await.unwrap(), 3);
    tx.commit().await.unwrap();

    let after = conversation(&db, &s).await;
    assert_eq!(after.id, before.id);
    assert!(after.updated_at > before.updated_at);
    assert!(page(&db, &s, None, 50).await.is_empty());
    assert_eq!(
        page(&db, &other, None, 50).await.len(),
        2,
        "other conversations untouched"
    );
}

/// The table numbers what it stores (the `number_message` trigger): a number a statement
/// names is not the one kept, an insert that conflicts takes none, and a reset does not start
/// numbering over (a client resuming from before it would miss what comes after).
#[tokio::test]
async fn the_table_numbers_every_message_and_a_reset_does_not_renumber() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    // A statement that names a number, as the steps did before the table gave it.
    let insert = |seq: i64, client: uuid::Uuid| {
        let (db, s) = (db.clone(), s);
        async move {
            let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
            let seq: Option<i64> = sqlx::query_scalar(
                "insert into web_conversation_messages
                     (conversation_id, tenant_id, role, content, seq, client_message_id)
                 values ($1, $2, 'user', 'x', $3, $4)
                 on conflict (conversation_id, client_message_id) do nothing
                 returning seq",
            )
            .bind(s.conversation)
            .bind(s.tenant)
            .bind(seq)
            .bind(client)
            .fetch_optional(&mut *tx)
            .await
            .unwrap();
            tx.commit().await.unwrap();
            seq
        }
    };
    let once = uuid::Uuid::new_v4();
    assert_eq!(insert(999, once).await, Some(1), "the table's number");
    assert_eq!(insert(2, once).await, None, "a conflict stores nothing");
    assert_eq!(
        insert(0, uuid::Uuid::new_v4()).await,
        Some(2),
        "and took no number"
    );

    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    assert_eq!(messages::reset(&mut tx, s.conversation).await.unwrap(), 2);
    tx.commit().await.unwrap();
    let after = store(&db, &s, 1).await;
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let page = messages::page(
        &mut tx,
        s.conversation,
        Branch::All,
        PageFrom::Newest,
        PageLimit::default(),
    )
    .await
    .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].message.id, after[0]);
    assert_eq!(page[0].message.seq, 3, "numbering goes on after a reset");
}
