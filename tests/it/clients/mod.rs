//! The routes mobile and web clients use with user tokens, the changes
//! feed, its long-poll and the live stream.

mod changes;
mod routes;
