//! `/api/portal/chat/conversations`: list, get-or-create, history, reset.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::{ApiState, ErrorBody, Json, Path, Query};
use crate::Error;
use crate::auth::PortalCaller;
use crate::db::conversations::{self, Conversation, ConversationSummary, ListFilter};
use crate::db::message_path;
use crate::db::messages::{self, Branch, MessageView, PageFrom};
use crate::db::{Scope, agents};
use crate::delivery::{Audience, ConnectionsFanout, Fanout};
use crate::domain::{AgentId, ConversationId, ListLimit, MessageId, PageLimit, TenantId};
use crate::frame::ServerFrame;
use crate::rbac::{open_conversation, require_tenant_member};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// The tenant whose conversations to list. Required, except for platform admins, who
    /// list every tenant's conversations without it.
    #[param(value_type = Option<Uuid>)]
    tenant_id: Option<String>,
    /// How many conversations at most, newest first.
    #[param(value_type = Option<u16>, minimum = 1, maximum = 500, default = 100)]
    limit: Option<String>,
}

/// The caller's conversations in a tenant, most recently updated first; a platform admin sees
/// every user's.
#[utoipa::path(
    get,
    path = "/api/portal/chat/conversations",
    tag = "conversations",
    params(ListParams),
    responses(
        (status = 200, description = "Conversations, newest `updated_at` first", body = [ConversationSummary]),
        (status = 400, description = "Bad `tenant_id` or `limit`", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a member of the tenant", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<ApiState>,
    caller: PortalCaller,
    Query(params): Query<ListParams>,
) -> Result<Json<Vec<ConversationSummary>>, Error> {
    let tenant_id = params
        .tenant_id
        .as_deref()
        .map(str::parse::<TenantId>)
        .transpose()?;
    let limit = ListLimit::parse(params.limit.as_deref())?;
    let admin = caller.platform_admin();
    let mut tx = match (tenant_id, admin) {
        (Some(tenant_id), _) => {
            let mut tx = state.db.begin(Scope::Tenant(tenant_id)).await?;
            require_tenant_member(&mut tx, &caller, tenant_id).await?;
            tx
        }
        (None, Some(admin)) => state.db.begin(Scope::AllTenants(admin)).await?,
        (None, None) => return Err(Error::BadRequest("tenant_id is required".into())),
    };
    let filter = ListFilter {
        tenant_id,
        user_id: admin.is_none().then(|| caller.user_id()),
        limit,
    };
    let rows = conversations::list(&mut tx, filter).await?;
    tx.commit().await?;
    Ok(Json(rows))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConversation {
    tenant_id: TenantId,
    agent_id: AgentId,
}

/// The caller's conversation with an agent, created when it does not exist yet.
#[utoipa::path(
    post,
    path = "/api/portal/chat/conversations",
    tag = "conversations",
    request_body = CreateConversation,
    responses(
        (status = 200, description = "The conversation existed", body = Conversation),
        (status = 201, description = "The conversation was created", body = Conversation),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a member of the tenant", body = ErrorBody),
        (status = 404, description = "No such agent in the tenant", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<ApiState>,
    caller: PortalCaller,
    Json(body): Json<CreateConversation>,
) -> Result<(StatusCode, Json<Conversation>), Error> {
    let mut tx = state.db.begin(Scope::Tenant(body.tenant_id)).await?;
    require_tenant_member(&mut tx, &caller, body.tenant_id).await?;
    let agent = agents::find(&mut tx, body.agent_id)
        .await?
        .filter(|agent| agent.is_active)
        .ok_or_else(|| Error::NotFound("no such agent in this tenant".into()))?;
    let got =
        conversations::get_or_create(&mut tx, body.tenant_id, agent.id, caller.user_id()).await?;
    tx.commit().await?;
    let status = if got.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(got.row)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// How many messages, at most; fewer when they pass 512 KiB of text (the page is cut at
    /// the end away from its cursor, so the next cursor is exact).
    #[param(value_type = Option<u16>, minimum = 1, maximum = 200, default = 50)]
    limit: Option<String>,
    /// A message id of this conversation: the page ends just before it. Without it (and
    /// without `after_seq`), the newest messages.
    #[param(value_type = Option<Uuid>)]
    before: Option<String>,
    /// A `seq`: the page holds the messages just after it (catching up). Not with `before`.
    #[param(value_type = Option<i64>, minimum = 0)]
    after_seq: Option<String>,
    /// `current` (the default): the conversation's current branch, the path from its head
    /// back. `all`: every message of the conversation (the whole tree), by `seq`.
    #[param(value_type = Option<String>, pattern = "^(current|all)$")]
    branch: Option<String>,
}

/// One page of a conversation's messages, oldest first.
#[utoipa::path(
    get,
    path = "/api/portal/chat/conversations/{id}/messages",
    tag = "conversations",
    params(("id" = Uuid, Path, description = "The conversation"), HistoryParams),
    responses(
        (status = 200, description = "Messages in ascending `seq`", body = [MessageView]),
        (status = 400, description = "Bad id, `limit` or `before`", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not your conversation", body = ErrorBody),
        (status = 404, description = "No such conversation", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn history(
    State(state): State<ApiState>,
    caller: PortalCaller,
    Path(id): Path<String>,
    Query(params): Query<HistoryParams>,
) -> Result<Json<Vec<MessageView>>, Error> {
    let id: ConversationId = id.parse()?;
    let limit = PageLimit::parse(params.limit.as_deref())?;
    let from = match (params.before.as_deref(), params.after_seq.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(Error::BadRequest(
                "give before or after_seq, not both".into(),
            ));
        }
        (Some(before), None) => PageFrom::Before(before.parse::<MessageId>()?),
        (None, Some(after)) => PageFrom::AfterSeq(
            after
                .parse::<i64>()
                .ok()
                .filter(|seq| *seq >= 0)
                .ok_or_else(|| Error::BadRequest("after_seq must be a seq: 0 or more".into()))?,
        ),
        (None, None) => PageFrom::Newest,
    };
    let branch = match params.branch.as_deref() {
        None | Some("current") => Branch::Current,
        Some("all") => Branch::All,
        Some(_) => return Err(Error::BadRequest("branch is `current` or `all`".into())),
    };
    let (mut tx, conversation) = open_conversation(&state.db, &caller, id).await?;
    let page = messages::page(&mut tx, conversation.id, branch, from, limit).await?;
    tx.commit().await?;
    Ok(Json(page.into_iter().map(MessageView::from).collect()))
}

/// Deletes the conversation's messages; the conversation stays, with a new `updated_at`.
#[utoipa::path(
    delete,
    path = "/api/portal/chat/conversations/{id}",
    tag = "conversations",
    params(("id" = Uuid, Path, description = "The conversation")),
    responses(
        (status = 204, description = "The messages are gone"),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not your conversation", body = ErrorBody),
        (status = 404, description = "No such conversation", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn reset(
    State(state): State<ApiState>,
    caller: PortalCaller,
    Path(id): Path<String>,
) -> Result<StatusCode, Error> {
    let id: ConversationId = id.parse()?;
    let (mut tx, conversation) = open_conversation(&state.db, &caller, id).await?;
    messages::reset(&mut tx, conversation.id).await?;
    tx.commit().await?;
    if caller.user_id() != conversation.user_id {
        // Only a platform admin can reach here: what it erased is on record with who did it.
        tracing::info!(
            conversation_id = %conversation.id,
            tenant_id = %conversation.tenant_id,
            owner_id = %conversation.user_id,
            reset_by = %caller.user_id(),
            role = ?caller.role(),
            "conversation reset by someone other than its owner"
        );
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT …/head`'s body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MoveHead {
    /// A message of the conversation: the head moves to the newest message of the branches
    /// through it (the message itself when nothing follows it).
    #[schema(value_type = Uuid)]
    message_id: String,
}

/// Where the current branch ends now.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct HeadView {
    #[schema(value_type = Uuid)]
    conversation_id: ConversationId,
    #[schema(value_type = Option<Uuid>)]
    head_id: Option<MessageId>,
    /// When the head is a user message whose reply has not started: the id it will take.
    #[schema(value_type = Option<Uuid>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_id: Option<MessageId>,
}

/// Moves the conversation's current branch; every socket of the conversation gets a `head`
/// frame.
#[utoipa::path(
    put,
    path = "/api/portal/chat/conversations/{id}/head",
    tag = "conversations",
    params(("id" = Uuid, Path, description = "The conversation")),
    request_body = MoveHead,
    responses(
        (status = 200, description = "The head moved", body = HeadView),
        (status = 400, description = "Bad id or body", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not your conversation", body = ErrorBody),
        (status = 404, description = "No such conversation or message", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn move_head(
    State(state): State<ApiState>,
    caller: PortalCaller,
    Path(id): Path<String>,
    Json(body): Json<MoveHead>,
) -> Result<Json<HeadView>, Error> {
    let id: ConversationId = id.parse()?;
    let message_id: MessageId = body.message_id.parse()?;
    // Checked as the history is: the owner, or a platform admin.
    let (tx, conversation) = open_conversation(&state.db, &caller, id).await?;
    tx.commit().await?;
    let head = message_path::move_head(
        &state.db,
        Scope::Tenant(conversation.tenant_id),
        conversation.tenant_id,
        conversation.id,
        message_id,
    )
    .await?;
    let frame = ServerFrame::Head {
        conversation_id: head.conversation_id,
        head_id: head.head_id,
        reply_id: head.reply_id,
    };
    let mut audience = Audience::new(head.tenant_id, head.conversation_id, head.recipients);
    let fanout = ConnectionsFanout::new(state.db.clone(), state.delivery.clone());
    if let Err(err) = fanout.send(&mut audience, &frame).await {
        tracing::warn!(
            error = &err as &dyn std::error::Error,
            "head not told to every socket"
        );
    }
    Ok(Json(HeadView {
        conversation_id: head.conversation_id,
        head_id: head.head_id,
        reply_id: head.reply_id,
    }))
}
