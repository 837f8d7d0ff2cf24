//! Delivery channels. Each turns one delivery into a provider call and
//! classifies what came back ([`SendError`] with an [`ErrorClass`]), so the
//! worker decides retries without knowing the provider.
//!
//! Development transports need nothing installed (email to `.eml` files,
//! push to a JSON-lines file); `herald-config` refuses them in production.

use std::time::Duration;

use herald_core::ErrorClass;

pub mod email;
pub mod push;

/// Why a send did not succeed, classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {message}")]
pub struct SendError {
    pub class: ErrorClass,
    /// The provider's own status (SMTP reply code, HTTP status).
    pub provider_status: Option<u16>,
    /// Free of secrets and personal data; truncated when recorded.
    pub message: String,
    /// The provider asked us to wait this long.
    pub retry_after: Option<Duration>,
}

impl SendError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            provider_status: None,
            message: message.into(),
            retry_after: None,
        }
    }

    #[must_use]
    pub fn with_status(mut self, status: u16) -> Self {
        self.provider_status = Some(status);
        self
    }
}
