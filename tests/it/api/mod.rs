//! The HTTP API: every bad input's answer, and idempotency keys.

mod errors;
mod idempotency;
