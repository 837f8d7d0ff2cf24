//! Users and their push devices.

use chrono::{DateTime, Utc};
use herald_core::DeviceId;
use serde::Serialize;
use sqlx::PgPool;

use crate::Result;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct User {
    pub id: String,
    pub email: Option<String>,
    pub locale: Option<String>,
    pub timezone: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Device {
    pub id: String,
    pub user_id: String,
    pub platform: String,
    pub provider: String,
    pub token: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
}

pub struct UserUpsert<'a> {
    pub id: &'a str,
    pub email: Option<&'a str>,
    pub locale: Option<&'a str>,
    pub timezone: Option<&'a str>,
}

/// Creates or replaces a user's profile; returns it and whether it is new.
pub async fn upsert_user(pool: &PgPool, u: &UserUpsert<'_>) -> Result<(User, bool)> {
    #[derive(sqlx::FromRow)]
    struct Upserted {
        #[sqlx(flatten)]
        user: User,
        inserted: bool,
    }
    // `xmax = 0` is true only for a freshly inserted row.
    let row: Upserted = sqlx::query_as(
        "INSERT INTO users (id, email, locale, timezone) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, locale = EXCLUDED.locale,
             timezone = EXCLUDED.timezone, updated_at = now()
         RETURNING id, email, locale, timezone, created_at, updated_at, (xmax = 0) AS inserted",
    )
    .bind(u.id)
    .bind(u.email)
    .bind(u.locale)
    .bind(u.timezone)
    .fetch_one(pool)
    .await?;
    Ok((row.user, row.inserted))
}

/// Makes sure a user row exists (a client registering its own device may
/// come before the product ever described the user).
pub async fn ensure_user(pool: &PgPool, id: &str) -> Result<()> {
    sqlx::query("INSERT INTO users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn get_user(pool: &PgPool, id: &str) -> Result<Option<User>> {
    Ok(
        sqlx::query_as("SELECT id, email, locale, timezone, created_at, updated_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

const DEVICE_COLUMNS: &str =
    "id, user_id, platform, provider, token, created_at, updated_at, disabled_at, disabled_reason";

/// Every device of a user, active ones first.
pub async fn list_devices(pool: &PgPool, user_id: &str) -> Result<Vec<Device>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = $1 ORDER BY disabled_at NULLS FIRST, created_at"
    ))
    .bind(user_id)
    .fetch_all(pool)
    .await?)
}

/// The devices a push goes to.
pub async fn active_devices(pool: &PgPool, user_id: &str) -> Result<Vec<Device>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = $1 AND disabled_at IS NULL ORDER BY created_at"
    ))
    .bind(user_id)
    .fetch_all(pool)
    .await?)
}

/// Registers a token for a user. A token is unique per provider: registering
/// it again (on this user or another, e.g. a phone that changed hands)
/// moves it and re-enables it if a provider had disabled it.
pub async fn register_device(
    pool: &PgPool,
    user_id: &str,
    platform: &str,
    provider: &str,
    token: &str,
) -> Result<(Device, bool)> {
    let row: (String, bool) = sqlx::query_as(
        "INSERT INTO devices (id, user_id, platform, provider, token) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (provider, token) DO UPDATE SET user_id = EXCLUDED.user_id, platform = EXCLUDED.platform,
             disabled_at = NULL, disabled_reason = NULL, updated_at = now()
         RETURNING id, (xmax = 0)",
    )
    .bind(DeviceId::generate().to_string())
    .bind(user_id)
    .bind(platform)
    .bind(provider)
    .bind(token)
    .fetch_one(pool)
    .await?;
    let device = sqlx::query_as(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"))
        .bind(&row.0)
        .fetch_one(pool)
        .await?;
    Ok((device, row.1))
}

/// Removes one of a user's devices; false when the user has no such device.
pub async fn delete_device(pool: &PgPool, user_id: &str, device_id: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM devices WHERE id = $1 AND user_id = $2")
        .bind(device_id)
        .bind(user_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Disables a device a provider reported gone; it is never sent to again
/// until it is registered anew.
pub async fn disable_device(pool: &PgPool, device_id: &str, reason: &str) -> Result<()> {
    sqlx::query(
        "UPDATE devices SET disabled_at = now(), disabled_reason = $2, updated_at = now()
         WHERE id = $1 AND disabled_at IS NULL",
    )
    .bind(device_id)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}
