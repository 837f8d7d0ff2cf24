//! Worker identities.

use std::fmt;

use rand::Rng;

/// Unique per worker instance: `<role>-<hostname>-<pid>-<random>`, e.g.
/// `email-worker-web3-4711-k3x9qa`. The random part makes a restarted
/// process (same host, maybe the same pid in a container) a new worker, so a
/// stale registration can never collide with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerId(String);

impl WorkerId {
    #[must_use]
    pub fn generate(role: &str) -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown-host".to_owned());
        const ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
        let mut rng = rand::rng();
        let random: String = (0..6)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect();
        Self(format!(
            "{}-{}-{}-{random}",
            sanitize(role),
            sanitize(&host),
            std::process::id()
        ))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Keeps ids printable and free of spaces: they appear in logs, in the
/// workers hash and in Redis `CLIENT LIST` (`lib-name`), which rejects spaces.
fn sanitize(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .take(63)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "unnamed".to_owned()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_are_unique_and_name_role_host_and_pid() {
        let a = WorkerId::generate("email worker");
        let b = WorkerId::generate("email worker");
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("email_worker-"), "{a}");
        assert!(a.as_str().contains(&format!("-{}-", std::process::id())), "{a}");
        assert!(!a.as_str().contains(' '));
    }
}
