//! Route handlers, one module per resource.

pub mod health;
pub mod notifications;
pub mod users;
