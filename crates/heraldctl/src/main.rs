//! `heraldctl`: Herald's operator CLI.
//!
//! `keys` talks to Postgres directly (`DATABASE_URL`): it is how the first
//! key is made, before any key exists to call the API with.

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "heraldctl",
    version,
    about = "Operate Herald",
    after_help = "Examples:
  heraldctl keys create --name billing-service --scopes send,read
  heraldctl keys list --json
  heraldctl keys revoke key_01JD…"
)]
struct Cli {
    /// Postgres URL (bootstrap commands only).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/herald",
        global = true,
        hide_env_values = true
    )]
    database_url: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage API keys.
    #[command(subcommand)]
    Keys(Keys),
    /// Apply pending database migrations and exit (deploys run this first).
    Migrate,
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
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let pool = herald_db::connect_lazy(&cli.database_url, 2).context("DATABASE_URL")?;
    herald_db::migrate(&pool)
        .await
        .context("applying migrations to DATABASE_URL")?;
    match cli.command {
        Command::Migrate => println!("migrations applied"),
        Command::Keys(Keys::Create { name, scopes }) => {
            herald_db::api_keys::check_scopes(&scopes).map_err(anyhow::Error::msg)?;
            let (key, token) = herald_db::api_keys::create_api_key(&pool, &name, &scopes).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"id": key.id, "name": key.name, "scopes": key.scopes, "token": token})
                );
            } else {
                println!("created {} ({}) with scopes {}", key.id, key.name, key.scopes.join(","));
                println!("token (shown once): {token}");
            }
        }
        Command::Keys(Keys::List) => {
            let keys = herald_db::api_keys::list_api_keys(&pool).await?;
            if cli.json {
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": k.scopes,
                        "created_at": k.created_at, "last_used_at": k.last_used_at, "revoked_at": k.revoked_at})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
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
    }
    Ok(())
}
