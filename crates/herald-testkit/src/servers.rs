//! Private Postgres and Redis servers for fault tests: each test that kills,
//! restarts or flushes a server gets its own, on a free port, so the shared
//! servers other tests use are never disturbed. Both stop when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nothing listens on right now.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A `redis-server` of this test's own, without persistence (like the
/// shared one), so a restart comes back empty.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut r = Self {
            port: free_port(),
            child: None,
            dir,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is Redis installed? see .ci/run)");
        self.child = Some(child);
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)),
            "private redis did not start"
        );
    }

    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: every queued job is gone with it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// `FLUSHALL` through redis-cli.
    pub fn flushall(&self) {
        let ok = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "FLUSHALL"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "FLUSHALL failed");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Postgres cluster of this test's own (initdb in a temp dir), which the
/// test may restart in fast or immediate mode.
pub struct PrivatePostgres {
    pub port: u16,
    data: PathBuf,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

fn postgres_bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("Postgres server binaries under /usr/lib/postgresql (see .ci/run)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs a Postgres binary, as the `postgres` user when we are root
/// (Postgres refuses to run as root).
fn pg_command(bin: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of the private Postgres directory failed");
        }
        let bin = postgres_bin_dir();
        let data_s = data.display().to_string();
        let out = pg_command(
            &bin.join("initdb"),
            &["-D", &data_s, "-A", "trust", "-U", "postgres", "--no-sync"],
        )
        .stdout(Stdio::null())
        .output()
        .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Self {
            port: free_port(),
            data,
            bin,
            _dir: dir,
        };
        pg.ctl(&["start", "-w", "-t", "30"]);
        pg
    }

    fn ctl(&self, args: &[&str]) {
        let data_s = self.data.display().to_string();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=200",
            self.port, data_s
        );
        let log = self.data.join("server.log").display().to_string();
        let mut full = vec!["-D", &data_s, "-o", &opts, "-l", &log];
        full.extend_from_slice(args);
        let out = pg_command(&self.bin.join("pg_ctl"), &full)
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A server URL (no database), for [`crate::TestDb::new_on`].
    #[must_use]
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Restarts the server; `mode` is `fast` or `immediate` (a crash, with
    /// recovery on start).
    pub fn restart(&self, mode: &str) {
        self.ctl(&["restart", "-m", mode, "-w", "-t", "60"]);
    }

    pub fn stop(&self, mode: &str) {
        self.ctl(&["stop", "-m", mode, "-w", "-t", "60"]);
    }

    pub fn start_again(&self) {
        self.ctl(&["start", "-w", "-t", "60"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data_s = self.data.display().to_string();
        let _ = pg_command(&self.bin.join("pg_ctl"), &["-D", &data_s, "stop", "-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
