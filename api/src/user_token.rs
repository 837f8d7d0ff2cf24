//! User tokens: what a mobile or web client holds instead of an API key.
//!
//! A product service mints one for one of its users
//! (`POST /v1/users/{user_id}/tokens`); it is a JWT signed with HS256 under
//! `HERALD_USER_TOKEN_SECRET`, carrying the user id and an expiry, so any
//! API replica verifies it without a database hit. It reaches only
//! `/v1/me/…` routes, and only that user's rows.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use herald_core::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::ApiError;

/// The audience every user token carries, so a JWT minted for anything
/// else under the same key is refused.
const AUDIENCE: &str = "herald-user";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    iat: u64,
    exp: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Signs a token for `user` valid for `ttl`; returns it and its expiry
/// (seconds since the epoch).
pub fn mint(secret: &str, user: &UserId, ttl: Duration) -> Result<(String, u64), ApiError> {
    let iat = unix_now();
    let claims = Claims {
        sub: user.to_string(),
        aud: AUDIENCE.to_owned(),
        iat,
        exp: iat + ttl.as_secs(),
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| ApiError::internal(&e))?;
    Ok((token, claims.exp))
}

/// Whether a bearer credential looks like a user token (a JWT) rather than
/// an API key, to tell callers they used the wrong kind.
#[must_use]
pub fn looks_like_user_token(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.matches('.').count() == 2
}

#[cfg(test)]
fn verify(secret: &str, token: &str) -> Result<UserId, ApiError> {
    verify_session(secret, token).map(|(user, _)| user)
}

/// The token's user and its expiry (seconds since the epoch).
fn verify_session(secret: &str, token: &str) -> Result<(UserId, u64), ApiError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "sub", "aud"]);
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &validation)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "user_token_expired",
                "the user token has expired; ask the app's backend for a new one",
            ),
            _ => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_user_token",
                "the user token is malformed or not signed by this Herald",
            ),
        })?;
    let user = UserId::parse(&data.claims.sub).map_err(|_| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_user_token",
            "the user token names no valid user",
        )
    })?;
    Ok((user, data.claims.exp))
}

/// The user a `/v1/me` request is for, from its bearer user token.
#[derive(Debug, Clone)]
pub struct Me(pub UserId);

impl FromRequestParts<AppState> for Me {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Session::from_request_parts(parts, state).await.map(|s| Me(s.user))
    }
}

/// [`Me`] plus when the token expires, for requests that outlive a moment
/// (the live stream ends when its token does).
#[derive(Debug, Clone)]
pub struct Session {
    pub user: UserId,
    pub expires_at: SystemTime,
}

impl FromRequestParts<AppState> for Session {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let bearer = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match bearer {
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_user_token",
                "send the user token as `Authorization: Bearer <token>`",
            )),
            Some(t) if t.starts_with("hk_") => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "api_key_not_allowed",
                "/v1/me routes take a user token, not an API key: mint one with POST /v1/users/{user_id}/tokens",
            )),
            Some(t) => verify_session(state.settings.user_token_secret.expose(), t).map(|(user, exp)| Session {
                user,
                expires_at: UNIX_EPOCH + Duration::from_secs(exp),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_minted_token_verifies_to_its_user() {
        let user = UserId::parse("u_42").unwrap();
        let (token, exp) = mint(SECRET, &user, Duration::from_secs(60)).unwrap();
        assert!(looks_like_user_token(&token));
        assert!(exp > unix_now());
        assert_eq!(verify(SECRET, &token).unwrap(), user);
    }

    #[test]
    fn a_token_signed_with_another_key_or_altered_is_refused() {
        let user = UserId::parse("u_42").unwrap();
        let (token, _) = mint("another-secret-another-secret-xx", &user, Duration::from_secs(60)).unwrap();
        assert_eq!(verify(SECRET, &token).unwrap_err().code, "invalid_user_token");
        let (good, _) = mint(SECRET, &user, Duration::from_secs(60)).unwrap();
        let mut forged = good.clone();
        forged.insert(forged.len() - 2, 'x');
        assert_eq!(verify(SECRET, &forged).unwrap_err().code, "invalid_user_token");
        assert_eq!(verify(SECRET, "not a token").unwrap_err().code, "invalid_user_token");
    }
}
