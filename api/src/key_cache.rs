//! A short-lived cache of authenticated API keys.
//!
//! Without it every request costs a round trip to Postgres before any work
//! starts: one extra query per request. A key that
//! authenticated within the last `HERALD_API_KEY_CACHE_SECS` is trusted
//! again without asking Postgres. The price is the revocation delay: a
//! revoked key keeps working on each API replica for at most that long.
//! `0` turns the cache off.
//!
//! Only successes are cached (an unknown or revoked token always asks
//! Postgres), and entries are keyed by the SHA-256 of the whole presented
//! token, so the cache holds no secret and a token with a wrong secret can
//! never match an entry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use herald_db::api_keys::ApiKey;
use sha2::{Digest, Sha256};

/// Most keys remembered at once; past it the cache starts over.
const MAX_ENTRIES: usize = 10_000;

/// The SHA-256 of a presented token.
type Digest32 = [u8; 32];

pub struct KeyCache {
    ttl: Duration,
    /// Shared with the requests that use them: a hit costs no copy.
    entries: Mutex<HashMap<Digest32, (Arc<ApiKey>, Instant)>>,
}

impl KeyCache {
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn digest(token: &str) -> Digest32 {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The key this token authenticated as within the TTL, if any.
    pub fn get(&self, token: &str) -> Option<Arc<ApiKey>> {
        if self.ttl.is_zero() {
            return None;
        }
        let digest = Self::digest(token);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match entries.get(&digest) {
            Some((key, at)) if at.elapsed() < self.ttl => Some(Arc::clone(key)),
            Some(_) => {
                entries.remove(&digest);
                None
            }
            None => None,
        }
    }

    /// Remembers a token Postgres just authenticated.
    pub fn put(&self, token: &str, key: &Arc<ApiKey>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(Self::digest(token), (Arc::clone(key), Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<ApiKey> {
        Arc::new(ApiKey {
            id: "key_1".into(),
            name: "k".into(),
            prefix: "abcdEFGH".into(),
            scopes: vec!["send".into()],
            created_at: chrono::Utc::now(),
            last_used_at: None,
            revoked_at: None,
        })
    }

    #[test]
    fn a_cached_key_answers_only_for_the_same_token_and_only_within_the_ttl() {
        let cache = KeyCache::new(Duration::from_millis(50));
        let token = "hk_abcdEFGH_0123456789abcdefghij0123456789AB";
        cache.put(token, &key());
        assert_eq!(cache.get(token).map(|k| k.id.clone()), Some("key_1".to_owned()));
        // Same prefix, another secret: not the cached key.
        assert!(cache.get("hk_abcdEFGH_0123456789abcdefghij0123456789AC").is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(token).is_none(), "an entry older than the TTL is not used");
    }

    #[test]
    fn a_zero_ttl_turns_the_cache_off() {
        let cache = KeyCache::new(Duration::ZERO);
        let token = "hk_abcdEFGH_0123456789abcdefghij0123456789AB";
        cache.put(token, &key());
        assert!(cache.get(token).is_none());
    }
}
