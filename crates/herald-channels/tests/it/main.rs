//! The channels against real peers: email against an SMTP server that is
//! not ours, push against stand-ins that speak FCM's, APNs' and Web Push's
//! documented contracts. One binary, so the suite links once; the two
//! log-capture tests (`email_smtp_logs.rs`, `push_logs.rs`) are binaries
//! of their own because each installs the process-wide tracing subscriber.

mod email_smtp;
mod push_apns;
mod push_fcm;
mod push_setup;
mod push_webpush;
