//! `heraldctl`: Herald's operator CLI.
//!
//! `queues`, `deliveries` and `dlq` talk to the admin API (`--api-url`,
//! key from `HERALD_API_KEY`); `keys` and `migrate` talk to Postgres
//! directly (`DATABASE_URL`): they are how the first key is made, before
//! any key exists to call the API with.

mod api;
mod output;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use api::{Api, Failure, Outcome, exit};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use output::Style;
use serde_json::{Value, json};

macro_rules! exit_codes {
    () => {
        "Exit codes:
  0  success
  1  unexpected error
  2  bad usage (unknown flag, bad value)
  3  the API refused the request (bad filter, not found, replay too large)
  4  no HERALD_API_KEY, an invalid key, or a key without the admin scope
  5  the API is unreachable or failing
  6  a destructive action was not confirmed (declined, or stdin is not a terminal and --yes is missing)
  7  a replay ended cancelled or failed, or could not process some deliveries"
    };
}

macro_rules! examples {
    () => {
        "Examples:
  heraldctl queues
  heraldctl dlq list --channel email --since 2h
  heraldctl dlq list --status dead --grep 'mailbox full' --json
  heraldctl dlq show dlv_01JD…
  heraldctl dlq replay --channel push --error-class transient --dry-run
  heraldctl dlq replay --id dlv_01JD… --id dlv_01JE… --yes
  heraldctl dlq replay --since 2026-11-21T00:00:00Z --pace 50
  heraldctl dlq status rpl_01JD… --wait
  heraldctl dlq purge --before 30d --yes
  heraldctl keys create --name ops --scopes admin

Environment: HERALD_API_URL, HERALD_API_KEY (admin scope), DATABASE_URL (keys, migrate), NO_COLOR."
    };
}

#[derive(Parser)]
#[command(
    name = "heraldctl",
    version,
    about = "Operate Herald: queues, dead letters, replays, purges and API keys",
    after_help = examples!(),
    after_long_help = concat!(examples!(), "\n\n", exit_codes!())
)]
struct Cli {
    /// The Herald API (queues, deliveries, dlq).
    #[arg(long, env = "HERALD_API_URL", default_value = "http://127.0.0.1:8080", global = true)]
    api_url: String,
    /// Postgres URL (keys and migrate only).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/herald",
        global = true,
        hide_env_values = true
    )]
    database_url: String,
    /// Print JSON instead of text (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The queue table: Redis depths and ages per channel × priority,
    /// Postgres counts and deliveries per minute per channel.
    Queues,
    /// Deliveries of any status.
    #[command(subcommand)]
    Deliveries(Deliveries),
    /// The dead-letter queue: failed and dead deliveries.
    #[command(subcommand)]
    Dlq(Dlq),
    /// Manage API keys (directly in Postgres).
    #[command(subcommand)]
    Keys(Keys),
    /// Apply pending database migrations and exit (deploys run this first).
    Migrate,
}

// Parsed once at start-up: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Deliveries {
    /// One delivery, its notification and every attempt.
    Show { id: String },
    /// Search deliveries of any status (default: all statuses).
    List {
        #[command(flatten)]
        filter: Filter,
        #[command(flatten)]
        page: Page,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Dlq {
    /// List failed and dead deliveries, newest first.
    List {
        #[command(flatten)]
        filter: Filter,
        #[command(flatten)]
        page: Page,
    },
    /// One delivery, its notification and every attempt.
    Show { id: String },
    /// Replay failed/dead deliveries: by --id, or everything the filter
    /// matches. Asks for confirmation unless --yes; waits with a progress
    /// bar unless --no-wait.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// A delivery to replay (repeatable); replaces the filter.
        #[arg(long = "id", value_name = "DLV_ID")]
        ids: Vec<String>,
        /// Only count what would be replayed, and show a sample.
        #[arg(long)]
        dry_run: bool,
        /// Deliveries per second (default: full pace).
        #[arg(long)]
        pace: Option<u32>,
        /// Go ahead when the filter matches more than HERALD_REPLAY_MAX.
        #[arg(long)]
        confirm_large: bool,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Return once the replay is recorded instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Follow (or show) a replay's progress.
    Status {
        /// `rpl_…`
        id: String,
        /// Wait until it ends, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a pending or running replay.
    Cancel {
        /// `rpl_…`
        id: String,
    },
    /// Recent replays (the audit trail).
    Replays,
    /// Delete failed/dead deliveries (and their attempts) that finished
    /// before --before and match the filter. Asks unless --yes.
    Purge {
        /// RFC 3339 time, or an age like 30d, 12h, 90m.
        #[arg(long)]
        before: String,
        #[command(flatten)]
        filter: Filter,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// The search filters, the same for list, replay and purge.
#[derive(Args, Debug, Default)]
struct Filter {
    /// Statuses, comma-separated (dlq: failed,dead by default).
    #[arg(long, value_delimiter = ',')]
    status: Vec<String>,
    /// email, push, in_app (comma-separated).
    #[arg(long, value_delimiter = ',')]
    channel: Vec<String>,
    /// permanent, transient, rate_limited, ambiguous (comma-separated).
    #[arg(long, value_delimiter = ',')]
    error_class: Vec<String>,
    /// The provider's last status code, e.g. 550 or 410.
    #[arg(long)]
    provider_status: Option<String>,
    /// The recipient's user id.
    #[arg(long)]
    user: Option<String>,
    /// A notification id (ntf_…).
    #[arg(long)]
    notification: Option<String>,
    /// Created at or after: RFC 3339, or an age like 2h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// Created before: RFC 3339, or an age like 2h, 7d.
    #[arg(long)]
    until: Option<String>,
    /// Text in the last error (case-insensitive).
    #[arg(long)]
    grep: Option<String>,
}

#[derive(Args, Debug)]
struct Page {
    /// Rows per page (1 to 200).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Continue from a previous page's cursor.
    #[arg(long)]
    cursor: Option<String>,
    /// Follow every page.
    #[arg(long)]
    all: bool,
}

#[derive(Subcommand)]
enum Keys {
    /// Create a key; its token is printed once and never stored.
    Create {
        #[arg(long)]
        name: String,
        /// Comma-separated: send, read, admin.
        #[arg(long, value_delimiter = ',', default_value = "send,read")]
        scopes: Vec<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by id or prefix.
    Revoke { key: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let style = Style::detect();
    match run(cli, style).await {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("{} {}", style.red("error:"), f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli, style: Style) -> Outcome<u8> {
    let json = cli.json;
    let api = || Api::new(&cli.api_url, std::env::var("HERALD_API_KEY").ok());
    match cli.command {
        Command::Migrate | Command::Keys(_) => {
            run_database_command(&cli.database_url, cli.command, json).await?;
            Ok(exit::OK)
        }
        Command::Queues => {
            let q = api()?.get("/v1/admin/queues").await?;
            print_or(json, &q, || output::queues(&q, style));
            Ok(exit::OK)
        }
        Command::Deliveries(Deliveries::Show { id }) | Command::Dlq(Dlq::Show { id }) => {
            let d = api()?
                .get(&format!("/v1/admin/deliveries/{}", path_segment(&id)))
                .await?;
            print_or(json, &d, || output::delivery(&d, style));
            Ok(exit::OK)
        }
        Command::Deliveries(Deliveries::List { filter, page }) => {
            list(&api()?, &filter, &page, false, json, style).await?;
            Ok(exit::OK)
        }
        Command::Dlq(Dlq::List { filter, page }) => {
            list(&api()?, &filter, &page, true, json, style).await?;
            Ok(exit::OK)
        }
        Command::Dlq(Dlq::Replay {
            filter,
            ids,
            dry_run,
            pace,
            confirm_large,
            yes,
            no_wait,
        }) => {
            let api = api()?;
            let mut body = if ids.is_empty() {
                json!({ "filter": filter.to_json(true)? })
            } else {
                if !filter.is_empty() {
                    return Err(Failure::new(
                        exit::USAGE,
                        "give either --id or filters, not both (a replay of ids ignores filters)",
                    ));
                }
                json!({ "delivery_ids": ids })
            };
            let dry = {
                let mut b = body.clone();
                b["dry_run"] = json!(true);
                api.post("/v1/admin/replays", &b).await?
            };
            if dry_run {
                print_or(json, &dry, || output::dry_run(&dry, style));
                return Ok(exit::OK);
            }
            let would = dry["would_replay"].as_i64().unwrap_or(0);
            let matched = dry["matched"].as_i64().unwrap_or(0);
            if !yes {
                confirm(&format!(
                    "Replay {would} deliveries ({matched} matched; they will be sent again)?"
                ))?;
            }
            if let Some(p) = pace {
                body["pace"] = json!(p);
            }
            body["confirm_large"] = json!(confirm_large);
            let created = api.post("/v1/admin/replays", &body).await?;
            let id = created["id"].as_str().unwrap_or_default().to_owned();
            if no_wait {
                print_or(json, &created, || {
                    format!(
                        "replay {id} recorded: {} matched\nfollow it: heraldctl dlq status {id} --wait\n",
                        created["matched"]
                    )
                });
                return Ok(exit::OK);
            }
            if !json {
                eprintln!("replay {id}: {} matched", created["matched"]);
            }
            let last = follow(&api, &id, json, style).await?;
            Ok(replay_exit(&last))
        }
        Command::Dlq(Dlq::Status { id, wait }) => {
            let api = api()?;
            if wait {
                let last = follow(&api, &id, json, style).await?;
                return Ok(replay_exit(&last));
            }
            let r = api.get(&format!("/v1/admin/replays/{}", path_segment(&id))).await?;
            print_or(json, &r, || output::replay(&r, style));
            Ok(exit::OK)
        }
        Command::Dlq(Dlq::Cancel { id }) => {
            let r = api()?
                .post(&format!("/v1/admin/replays/{}/cancel", path_segment(&id)), &json!({}))
                .await?;
            print_or(json, &r, || output::replay(&r, style));
            Ok(exit::OK)
        }
        Command::Dlq(Dlq::Replays) => {
            let r = api()?.get("/v1/admin/replays").await?;
            print_or(json, &r, || output::replays(&r, style));
            Ok(exit::OK)
        }
        Command::Dlq(Dlq::Purge {
            before,
            filter,
            dry_run,
            yes,
        }) => {
            let api = api()?;
            let before = parse_when(&before, "--before")?.to_rfc3339();
            let body = json!({ "before": before, "filter": filter.to_json(true)?, "dry_run": true });
            let dry = api.post("/v1/admin/purges", &body).await?;
            if dry_run {
                print_or(json, &dry, || {
                    format!("{} dead letters would be deleted\n", dry["deleted"])
                });
                return Ok(exit::OK);
            }
            if !yes {
                confirm(&format!(
                    "Delete {} dead letters (and their attempts) that finished before {before}? This cannot be undone.",
                    dry["deleted"]
                ))?;
            }
            let mut body = body;
            body["dry_run"] = json!(false);
            let done = api.post("/v1/admin/purges", &body).await?;
            print_or(json, &done, || {
                format!(
                    "purge {}: {} dead letters deleted\n",
                    done["id"].as_str().unwrap_or("-"),
                    done["deleted"]
                )
            });
            Ok(exit::OK)
        }
    }
}

fn print_or(json: bool, value: &Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        print!("{}", text());
    }
}

/// Ids go into URL paths: keep only what an id can contain, so a stray
/// `/` or `?` cannot reach another route.
fn path_segment(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

fn replay_exit(last: &Value) -> u8 {
    if last["status"] == "completed" && last["failed"].as_i64().unwrap_or(0) == 0 {
        exit::OK
    } else {
        exit::REPLAY_INCOMPLETE
    }
}

/// Asks on the terminal; refuses to ask when stdin is not one.
fn confirm(question: &str) -> Outcome {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            exit::NOT_CONFIRMED,
            "refusing to prompt: stdin is not a terminal; pass --yes to confirm",
        ));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the answer")?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(Failure::new(exit::NOT_CONFIRMED, "not confirmed; nothing was done"))
    }
}

/// Polls a replay until it ends, with a progress bar on a terminal.
async fn follow(api: &Api, id: &str, json: bool, style: Style) -> Outcome<Value> {
    let path = format!("/v1/admin/replays/{}", path_segment(id));
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} {msg} ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    loop {
        let r = api.get(&path).await?;
        let done = r["replayed"].as_u64().unwrap_or(0)
            + r["skipped"].as_u64().unwrap_or(0)
            + r["failed"].as_u64().unwrap_or(0);
        if let Some(bar) = &bar {
            bar.set_length(r["matched"].as_u64().unwrap_or(0));
            bar.set_position(done);
            bar.set_message(format!("{} replayed, {} skipped", r["replayed"], r["skipped"]));
        }
        if !matches!(r["status"].as_str(), Some("pending" | "running")) {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            print_or(json, &r, || output::replay(&r, style));
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn list(api: &Api, f: &Filter, page: &Page, dead_letters: bool, json: bool, style: Style) -> Outcome {
    let mut query = f.to_query(dead_letters)?;
    query.push(("limit".into(), page.limit.to_string()));
    let mut cursor = page.cursor.clone();
    let mut all = Vec::new();
    loop {
        let mut q = query.clone();
        if let Some(c) = &cursor {
            q.push(("cursor".into(), c.clone()));
        }
        let qs: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&q)
            .finish();
        let res = api.get(&format!("/v1/admin/deliveries?{qs}")).await?;
        let rows = res["deliveries"].as_array().cloned().unwrap_or_default();
        cursor = res["next_cursor"].as_str().map(str::to_owned);
        if !page.all {
            print_or(json, &res, || output::deliveries(&rows, style));
            if let (Some(c), false) = (&cursor, json) {
                eprintln!("more: --cursor {c}  (or --all)");
            }
            return Ok(());
        }
        all.extend(rows);
        if cursor.is_none() {
            let doc = json!({ "deliveries": all, "next_cursor": null });
            print_or(json, &doc, || output::deliveries(&all, style));
            return Ok(());
        }
    }
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.status.is_empty()
            && self.channel.is_empty()
            && self.error_class.is_empty()
            && self.provider_status.is_none()
            && self.user.is_none()
            && self.notification.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.grep.is_none()
    }

    /// Name/value pairs in the API's field names (times made absolute).
    fn to_query(&self, dead_letters: bool) -> Outcome<Vec<(String, String)>> {
        let mut q = Vec::new();
        let status = if self.status.is_empty() && dead_letters {
            vec!["failed".to_owned(), "dead".to_owned()]
        } else {
            self.status.clone()
        };
        if !status.is_empty() {
            q.push(("status".into(), status.join(",")));
        }
        if !self.channel.is_empty() {
            q.push(("channel".into(), self.channel.join(",")));
        }
        if !self.error_class.is_empty() {
            q.push(("error_class".into(), self.error_class.join(",")));
        }
        let mut one = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                q.push((k.to_owned(), v.clone()));
            }
        };
        one("provider_status", &self.provider_status);
        one("user_id", &self.user);
        one("notification_id", &self.notification);
        one("q", &self.grep);
        if let Some(s) = &self.since {
            q.push(("since".into(), parse_when(s, "--since")?.to_rfc3339()));
        }
        if let Some(u) = &self.until {
            q.push(("until".into(), parse_when(u, "--until")?.to_rfc3339()));
        }
        Ok(q)
    }

    /// The JSON `filter` of replays and purges.
    fn to_json(&self, dead_letters: bool) -> Outcome<Value> {
        let mut map = serde_json::Map::new();
        for (k, v) in self.to_query(dead_letters)? {
            let v = if matches!(k.as_str(), "status" | "channel" | "error_class") {
                Value::Array(v.split(',').map(|s| Value::String(s.to_owned())).collect())
            } else {
                Value::String(v)
            };
            map.insert(k, v);
        }
        Ok(Value::Object(map))
    }
}

/// RFC 3339, or an age before now: `90s`, `15m`, `2h`, `7d`.
fn parse_when(s: &str, flag: &str) -> Outcome<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || {
        Failure::new(
            exit::REFUSED,
            format!("{flag} `{s}`: expected an RFC 3339 time (2026-11-22T09:30:00Z) or an age like 90s, 15m, 2h, 7d"),
        )
    };
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad()),
    };
    Ok(Utc::now() - chrono::Duration::seconds(secs))
}

async fn run_database_command(database_url: &str, command: Command, json: bool) -> anyhow::Result<()> {
    let pool = herald_db::connect_lazy(database_url, 2).context("DATABASE_URL")?;
    herald_db::migrate(&pool)
        .await
        .context("applying migrations to DATABASE_URL")?;
    match command {
        Command::Keys(Keys::Create { name, scopes }) => {
            herald_db::api_keys::check_scopes(&scopes).map_err(anyhow::Error::msg)?;
            let (key, token) = herald_db::api_keys::create_api_key(&pool, &name, &scopes).await?;
            if json {
                println!(
                    "{}",
                    json!({"id": key.id, "name": key.name, "scopes": key.scopes, "token": token})
                );
            } else {
                println!("created {} ({}) with scopes {}", key.id, key.name, key.scopes.join(","));
                println!("token (shown once): {token}");
            }
        }
        Command::Keys(Keys::List) => {
            let keys = herald_db::api_keys::list_api_keys(&pool).await?;
            if json {
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        json!({"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": k.scopes,
                        "created_at": k.created_at, "last_used_at": k.last_used_at, "revoked_at": k.revoked_at})
                    })
                    .collect();
                println!("{}", Value::Array(rows));
            } else {
                println!("{:<30} {:<10} {:<20} {:<16} STATUS", "ID", "PREFIX", "NAME", "SCOPES");
                for k in keys {
                    let status = if k.revoked_at.is_some() { "revoked" } else { "active" };
                    println!(
                        "{:<30} {:<10} {:<20} {:<16} {status}",
                        k.id,
                        k.prefix,
                        k.name,
                        k.scopes.join(",")
                    );
                }
            }
        }
        Command::Keys(Keys::Revoke { key }) => {
            anyhow::ensure!(
                herald_db::api_keys::revoke_api_key(&pool, &key).await?,
                "no active key `{key}`"
            );
            println!("revoked {key}");
        }
        _ => println!("migrations applied"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_rfc3339_times_are_both_accepted() {
        let t = parse_when("2026-11-22T09:30:00Z", "--since").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-22T09:30:00+00:00");
        let two_hours = parse_when("2h", "--since").unwrap();
        let age = Utc::now() - two_hours;
        assert!((age.num_seconds() - 7200).abs() < 5);
        assert_eq!(parse_when("yesterday", "--since").unwrap_err().code, exit::REFUSED);
        assert_eq!(parse_when("5w", "--since").unwrap_err().code, exit::REFUSED);
    }

    #[test]
    fn the_dead_letter_filter_defaults_to_failed_and_dead() {
        let q = Filter::default().to_query(true).unwrap();
        assert_eq!(q, vec![("status".to_owned(), "failed,dead".to_owned())]);
        assert!(Filter::default().to_query(false).unwrap().is_empty());
    }

    #[test]
    fn ids_cannot_smuggle_another_path() {
        assert_eq!(path_segment("dlv_01JD/../../queues?x"), "dlv_01JDqueuesx");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
