//! Text output: tables and detail views of the admin API's JSON, with
//! colours only on a terminal (and never with `NO_COLOR` or `TERM=dumb`).

use std::fmt::Write as _;
use std::io::IsTerminal;

use serde_json::Value;

#[derive(Debug, Clone, Copy)]
pub struct Style {
    colour: bool,
}

impl Style {
    /// Colours when stdout is a terminal and nothing asks otherwise.
    #[must_use]
    pub fn detect() -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Self {
            colour: std::io::stdout().is_terminal() && !no_color && !dumb,
        }
    }

    fn paint(self, code: &str, s: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    #[must_use]
    pub fn red(self, s: &str) -> String {
        self.paint("31", s)
    }

    fn bold(self, s: &str) -> String {
        self.paint("1", s)
    }

    fn dim(self, s: &str) -> String {
        self.paint("2", s)
    }

    /// A status, coloured by what it means, padded to `width`.
    fn status(self, s: &str, width: usize) -> String {
        let padded = format!("{s:<width$}");
        match s {
            "dead" | "failed" | "cancelled" => self.paint("31", &padded),
            "sent" | "delivered" | "completed" => self.paint("32", &padded),
            "retrying" | "running" | "pending" | "queued" | "sending" => self.paint("33", &padded),
            _ => padded,
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `2026-11-22T09:30:00.123456Z` → `2026-11-22 09:30:00`.
fn time(v: &Value) -> String {
    v.as_str()
        .map_or_else(|| "-".to_owned(), |s| s.replace('T', " ").chars().take(19).collect())
}

fn clip(s: &str, n: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() > n {
        format!("{}…", one_line.chars().take(n.saturating_sub(1)).collect::<String>())
    } else {
        one_line
    }
}

fn age(ms: &Value) -> String {
    match ms.as_u64() {
        None => "-".to_owned(),
        Some(ms) if ms < 1_000 => format!("{ms}ms"),
        Some(ms) if ms < 60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}m", ms / 60_000),
    }
}

pub fn queues(q: &Value, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        style.bold(&format!(
            "{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "CHANNEL", "QUEUED", "SENDING", "RETRYING", "FAILED", "DEAD", "DONE/MIN"
        ))
    );
    for c in q["channels"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            text(&c["channel"]),
            text(&c["queued"]),
            text(&c["sending"]),
            text(&c["retrying"]),
            text(&c["failed"]),
            text(&c["dead"]),
            text(&c["per_minute"])
        );
    }
    out.push('\n');
    if q["redis"] != "ok" {
        let _ = writeln!(out, "{}", style.red(&format!("Redis: {}", text(&q["redis"]))));
        return out;
    }
    let _ = writeln!(
        out,
        "{}",
        style.bold(&format!(
            "{:<16} {:>9} {:>9} {:>9} {:>6} {:>8}",
            "QUEUE", "READY", "SCHEDULED", "IN FLIGHT", "DEAD", "OLDEST"
        ))
    );
    for x in q["queues"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>9} {:>9} {:>6} {:>8}",
            text(&x["queue"]),
            text(&x["ready"]),
            text(&x["scheduled"]),
            text(&x["in_flight"]),
            text(&x["dead"]),
            age(&x["oldest_ready_age_ms"])
        );
    }
    out
}

pub fn deliveries(rows: &[Value], style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        style.bold(&format!(
            "{:<19}  {:<30} {:<9} {:<7} {:<16} {:>5} {:<12} {:>4}  ERROR",
            "CREATED", "ID", "STATUS", "CHANNEL", "USER", "TRIES", "CLASS", "CODE"
        ))
    );
    for d in rows {
        let _ = writeln!(
            out,
            "{:<19}  {:<30} {} {:<7} {:<16} {:>5} {:<12} {:>4}  {}",
            time(&d["created_at"]),
            text(&d["id"]),
            style.status(d["status"].as_str().unwrap_or("-"), 9),
            text(&d["channel"]),
            clip(&text(&d["user_id"]), 16),
            format!("{}/{}", text(&d["attempts"]), text(&d["max_attempts"])),
            text(&d["last_error_class"]),
            text(&d["last_provider_status"]),
            clip(&text(&d["last_error"]), 70)
        );
    }
    let _ = writeln!(out, "{}", style.dim(&format!("{} deliveries", rows.len())));
    out
}

pub fn delivery(doc: &Value, style: Style) -> String {
    let d = &doc["delivery"];
    let n = &doc["notification"];
    let mut out = String::new();
    let kv = |out: &mut String, k: &str, v: String| {
        let _ = writeln!(out, "{} {v}", style.dim(&format!("{k:>14}")));
    };
    let _ = writeln!(
        out,
        "{} {}",
        style.bold(&text(&d["id"])),
        style.status(d["status"].as_str().unwrap_or("-"), 0)
    );
    kv(
        &mut out,
        "channel",
        format!("{} ({})", text(&d["channel"]), text(&d["priority"])),
    );
    kv(&mut out, "user", text(&d["user_id"]));
    kv(
        &mut out,
        "notification",
        format!(
            "{} [{}] {}",
            text(&n["id"]),
            text(&n["category"]),
            clip(&text(&n["title"]), 60)
        ),
    );
    kv(
        &mut out,
        "attempts",
        format!("{} of {}", text(&d["attempts"]), text(&d["max_attempts"])),
    );
    kv(&mut out, "ambiguous", text(&d["ambiguous_attempts"]));
    kv(
        &mut out,
        "last error",
        format!(
            "{} [{} {}]",
            text(&d["last_error"]),
            text(&d["last_error_class"]),
            text(&d["last_provider_status"])
        ),
    );
    kv(&mut out, "created", time(&d["created_at"]));
    kv(&mut out, "finished", time(&d["finished_at"]));
    kv(&mut out, "request id", text(&n["request_id"]));
    out.push('\n');
    let _ = writeln!(
        out,
        "{}",
        style.bold(&format!(
            "{:>3}  {:<19}  {:<13} {:>4}  {:<28} ERROR",
            "#", "STARTED", "OUTCOME", "CODE", "WORKER"
        ))
    );
    for a in doc["attempts"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:>3}  {:<19}  {:<13} {:>4}  {:<28} {}",
            text(&a["attempt"]),
            time(&a["started_at"]),
            text(&a["outcome"]),
            text(&a["provider_status"]),
            clip(&text(&a["worker_id"]), 28),
            clip(&text(&a["error"]), 80)
        );
    }
    out
}

pub fn dry_run(d: &Value, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} would be replayed of {} matched (dry run: nothing changed)",
        style.bold(&text(&d["would_replay"])),
        text(&d["matched"])
    );
    if let Some(skips) = d["would_skip"].as_object() {
        for (why, n) in skips {
            let _ = writeln!(out, "  {} skipped: {why}", text(n));
        }
    }
    let max = d["max_without_confirmation"].as_i64().unwrap_or(i64::MAX);
    if d["matched"].as_i64().unwrap_or(0) > max {
        let _ = writeln!(
            out,
            "{}",
            style.red(&format!(
                "more than HERALD_REPLAY_MAX ({max}): the replay needs --confirm-large"
            ))
        );
    }
    let sample: Vec<Value> = d["sample"].as_array().cloned().unwrap_or_default();
    if !sample.is_empty() {
        out.push('\n');
        out.push_str(&deliveries(&sample, style));
    }
    out
}

pub fn replay(r: &Value, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replay {} {}: {} matched, {} replayed, {} skipped, {} failed",
        style.bold(&text(&r["id"])),
        style.status(r["status"].as_str().unwrap_or("-"), 0),
        text(&r["matched"]),
        text(&r["replayed"]),
        text(&r["skipped"]),
        text(&r["failed"])
    );
    if let Some(reasons) = r["skip_reasons"].as_object() {
        for (why, n) in reasons {
            let _ = writeln!(out, "  {} skipped: {why}", text(n));
        }
    }
    if let Some(e) = r["error"].as_str() {
        let _ = writeln!(out, "{}", style.red(&format!("error: {e}")));
    }
    out
}

pub fn replays(list: &Value, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        style.bold(&format!(
            "{:<30} {:<10} {:<19}  {:<20} {:>8} {:>8} {:>8} {:>6}",
            "ID", "STATUS", "CREATED", "BY", "MATCHED", "REPLAYED", "SKIPPED", "FAILED"
        ))
    );
    for r in list["replays"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<30} {} {:<19}  {:<20} {:>8} {:>8} {:>8} {:>6}",
            text(&r["id"]),
            style.status(r["status"].as_str().unwrap_or("-"), 10),
            time(&r["created_at"]),
            clip(&text(&r["requested_by"]["api_key_name"]), 20),
            text(&r["matched"]),
            text(&r["replayed"]),
            text(&r["skipped"]),
            text(&r["failed"])
        );
    }
    out
}
