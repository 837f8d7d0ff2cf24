//! What the bench runs Herald on: a fresh database and Redis prefix of its
//! own, and Herald's real binaries as separate processes (the API, one
//! process per channel worker), with their peak memory read from /proc.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The binaries the bench starts, found next to its own executable.
pub const API: &str = "herald-api";
pub const WORKERS: [&str; 3] = ["herald-email-worker", "herald-push-worker", "herald-inapp-worker"];

/// Where Herald's binaries are: the directory of this executable, which
/// `cargo build` fills for the whole workspace.
pub fn binaries_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating herald-bench")?;
    let dir = exe.parent().context("herald-bench has no directory")?.to_owned();
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("release");
    let missing: Vec<&str> = std::iter::once(API)
        .chain(WORKERS)
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        let flag = if profile == "release" { " --release" } else { "" };
        bail!(
            "{} not found in {} (the bench runs Herald's real binaries, built next to it); \
             build them first: cargo build{flag} --bins",
            missing.join(", "),
            dir.display()
        );
    }
    if profile != "release" {
        eprintln!(
            "warning: {profile} build; measure with `cargo build --release --bins` and target/release/herald-bench"
        );
    }
    Ok(dir)
}

/// The bench's own database on the local server.
pub struct BenchDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    server: String,
}

impl BenchDb {
    pub async fn create(server: &str) -> anyhow::Result<Self> {
        let name = format!("herald_bench_{}", std::process::id());
        let admin = admin(server).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .context("creating the bench database")?;
        admin.close().await;
        let url = format!("{server}/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .context("connecting to the bench database")?;
        herald_db::migrate(&pool)
            .await
            .context("migrating the bench database")?;
        Ok(Self {
            name,
            url,
            pool,
            server: server.to_owned(),
        })
    }

    pub async fn drop_db(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let admin = admin(&self.server).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
            .execute(&admin)
            .await?;
        admin.close().await;
        Ok(())
    }
}

async fn admin(server: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&format!("{server}/postgres"))
        .await
        .with_context(|| format!("connecting to Postgres at {server} (is it running?)"))
}

/// One Herald process started by the bench.
pub struct HeraldProcess {
    pub name: &'static str,
    child: Child,
    /// Highest VmHWM seen, in kB.
    pub peak_kb: u64,
}

impl HeraldProcess {
    pub fn spawn(
        dir: &Path,
        name: &'static str,
        env: &HashMap<String, String>,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("{name}.log")))
            .context("opening a process log")?;
        let child = Command::new(dir.join(name))
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name,
            child,
            peak_kb: 0,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads VmHWM (peak resident) and VmRSS, in kB, and keeps the peak.
    pub fn sample_memory(&mut self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find(|l| l.starts_with(name))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let (hwm, rss) = (field("VmHWM:")?, field("VmRSS:")?);
        self.peak_kb = self.peak_kb.max(hwm);
        Some((hwm, rss))
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited unexpectedly ({status}); see its log", self.name);
        }
        Ok(())
    }

    /// SIGTERM, then a bounded wait (SIGKILL after it); returns the peak.
    pub fn stop(mut self) -> u64 {
        self.sample_memory();
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.peak_kb;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.peak_kb
    }
}

impl Drop for HeraldProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free port on loopback (bound, then released for the API to take).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
