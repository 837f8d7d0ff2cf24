//! Operators' tools: the admin API, the admin page in a real browser, and
//! figures over a large dead-letter queue.

mod api;
mod figures;
mod page;
