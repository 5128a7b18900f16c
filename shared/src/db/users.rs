//! `portal_users`: global, since one user may belong to several tenants.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use crate::Error;
use crate::domain::UserId;
use crate::error::ResultExt;

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct PortalUser {
    pub id: UserId,
    pub email: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

pub async fn insert(conn: &mut PgConnection, email: &str, name: &str) -> Result<PortalUser, Error> {
    crate::checked!(
        query_as,
        "insert into portal_users (email, name) values ($1, $2) returning *",
        email,
        name
    )
    .fetch_one(conn)
    .await
    .on_constraint("portal_users_email_key", || {
        Error::Conflict("a user with this email exists".into())
    })
}

pub async fn find(conn: &mut PgConnection, id: UserId) -> Result<Option<PortalUser>, Error> {
    Ok(
        crate::checked!(query_as, "select * from portal_users where id = $1", id)
            .fetch_optional(conn)
            .await?,
    )
}

pub async fn find_by_email(
    conn: &mut PgConnection,
    email: &str,
) -> Result<Option<PortalUser>, Error> {
    Ok(crate::checked!(
        query_as,
        "select * from portal_users where lower(email) = lower($1)",
        email
    )
    .fetch_optional(conn)
    .await?)
}
