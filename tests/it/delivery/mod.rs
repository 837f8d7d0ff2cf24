//! Delivery through the real workers: end to end over HTTP, retries and
//! dead letters, push intents, and worker processes sharing a queue.

mod e2e;
mod push_intents;
mod retries;
mod worker_processes;
