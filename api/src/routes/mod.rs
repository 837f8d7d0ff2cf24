//! Route handlers, one module per resource.

pub mod admin;
pub mod changes;
pub mod health;
pub mod me;
pub mod notifications;
pub mod users;
