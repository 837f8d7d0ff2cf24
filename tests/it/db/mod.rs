//! Herald's SQL statements against the real Postgres: the accept
//! statement, the attempt fence, and the schema's own guarantees.

mod accept;
mod fencing;
mod schema;
