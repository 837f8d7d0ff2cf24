//! API keys: `hk_<prefix>_<secret>`. The prefix finds the row; only the
//! SHA-256 of the secret is stored, compared in constant time.

use chrono::{DateTime, Utc};
use herald_core::ApiKeyId;
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use crate::Result;

pub const SCOPES: &[&str] = &["send", "read", "admin"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    #[must_use]
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: String,
    name: String,
    prefix: String,
    secret_hash: Vec<u8>,
    scopes: Vec<String>,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRow> for ApiKey {
    fn from(r: ApiKeyRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            prefix: r.prefix,
            scopes: r.scopes,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// The parts of a presented key. Parsing never touches the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub prefix: &'a str,
    pub secret: &'a str,
}

impl<'a> PresentedKey<'a> {
    /// `hk_<prefix>_<secret>`, prefix 8 and secret 32 alphanumerics.
    #[must_use]
    pub fn parse(token: &'a str) -> Option<Self> {
        let rest = token.strip_prefix("hk_")?;
        let (prefix, secret) = rest.split_once('_')?;
        let alnum = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric());
        (prefix.len() == 8 && secret.len() >= 32 && secret.len() <= 64 && alnum(prefix) && alnum(secret))
            .then_some(Self { prefix, secret })
    }
}

fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn random_alnum(n: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(n).map(char::from).collect()
}

/// Rejects scopes outside [`SCOPES`], with a message naming the bad one.
pub fn check_scopes(scopes: &[String]) -> std::result::Result<(), String> {
    match scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        Some(bad) => Err(format!("unknown scope `{bad}`: expected some of {}", SCOPES.join(", "))),
        None if scopes.is_empty() => Err(format!("at least one scope is required: {}", SCOPES.join(", "))),
        None => Ok(()),
    }
}

/// Creates a key and returns it with its full token, which is shown once
/// and never stored.
pub async fn create_api_key(pool: &PgPool, name: &str, scopes: &[String]) -> Result<(ApiKey, String)> {
    let prefix = random_alnum(8);
    let secret = random_alnum(32);
    let key = insert_api_key(pool, name, &prefix, &secret, scopes).await?;
    Ok((key, format!("hk_{prefix}_{secret}")))
}

/// Inserts a key with a given token, or returns the existing one with the
/// same prefix (used for the documented development key).
pub async fn ensure_api_key(pool: &PgPool, name: &str, token: &str, scopes: &[String]) -> Result<ApiKey> {
    let presented =
        PresentedKey::parse(token).ok_or_else(|| crate::DbError::InvalidUrl("malformed API key token".into()))?;
    sqlx::query(
        "INSERT INTO api_keys (id, name, prefix, secret_hash, scopes) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (prefix) DO UPDATE SET secret_hash = EXCLUDED.secret_hash, scopes = EXCLUDED.scopes, revoked_at = NULL",
    )
    .bind(ApiKeyId::generate().to_string())
    .bind(name)
    .bind(presented.prefix)
    .bind(hash_secret(presented.secret))
    .bind(scopes)
    .execute(pool)
    .await?;
    find_by_prefix(pool, presented.prefix)
        .await?
        .map(|(k, _)| k)
        .ok_or(crate::DbError::Other(sqlx::Error::RowNotFound))
}

async fn insert_api_key(pool: &PgPool, name: &str, prefix: &str, secret: &str, scopes: &[String]) -> Result<ApiKey> {
    let row: ApiKeyRow = sqlx::query_as(
        "INSERT INTO api_keys (id, name, prefix, secret_hash, scopes) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, name, prefix, secret_hash, scopes, created_at, last_used_at, revoked_at",
    )
    .bind(ApiKeyId::generate().to_string())
    .bind(name)
    .bind(prefix)
    .bind(hash_secret(secret))
    .bind(scopes)
    .fetch_one(pool)
    .await?;
    Ok(row.into())
}

async fn find_by_prefix(pool: &PgPool, prefix: &str) -> Result<Option<(ApiKey, Vec<u8>)>> {
    let row: Option<ApiKeyRow> = sqlx::query_as(
        "SELECT id, name, prefix, secret_hash, scopes, created_at, last_used_at, revoked_at
         FROM api_keys WHERE prefix = $1",
    )
    .bind(prefix)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| {
        let hash = r.secret_hash.clone();
        (r.into(), hash)
    }))
}

/// The key a token names, if the token is well-formed, the secret matches
/// and the key is not revoked.
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Option<ApiKey>> {
    let Some(presented) = PresentedKey::parse(token) else {
        return Ok(None);
    };
    let Some((key, stored)) = find_by_prefix(pool, presented.prefix).await? else {
        return Ok(None);
    };
    let matches: bool = hash_secret(presented.secret).ct_eq(&stored).into();
    Ok((matches && key.revoked_at.is_none()).then_some(key))
}

pub async fn list_api_keys(pool: &PgPool) -> Result<Vec<ApiKey>> {
    let rows: Vec<ApiKeyRow> = sqlx::query_as(
        "SELECT id, name, prefix, secret_hash, scopes, created_at, last_used_at, revoked_at
         FROM api_keys ORDER BY created_at",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Revokes a key by id or prefix; returns whether one was revoked.
pub async fn revoke_api_key(pool: &PgPool, id_or_prefix: &str) -> Result<bool> {
    let done =
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE (id = $1 OR prefix = $1) AND revoked_at IS NULL")
            .bind(id_or_prefix)
            .execute(pool)
            .await?;
    Ok(done.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_splits_into_prefix_and_secret() {
        let k = PresentedKey::parse("hk_abcdEFGH_0123456789abcdefghij0123456789AB").unwrap();
        assert_eq!(k.prefix, "abcdEFGH");
        assert!(PresentedKey::parse("hk_short_x").is_none());
        assert!(PresentedKey::parse("Bearer hk_abcdEFGH_0123456789abcdefghij0123456789AB").is_none());
        assert!(PresentedKey::parse("hk_abcdEFGH_0123456789abcdefghij01234567!!").is_none());
    }

    #[test]
    fn scopes_are_checked_against_the_known_set() {
        assert!(check_scopes(&["send".into()]).is_ok());
        assert!(check_scopes(&[]).is_err());
        assert!(check_scopes(&["root".into()]).unwrap_err().contains("root"));
    }
}
