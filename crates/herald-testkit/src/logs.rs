//! Capturing `tracing` output in memory, for tests that check what the
//! logs say (and what they must never say: secrets, tokens).

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A `tracing` writer into memory; clones share the buffer.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Installs a process-wide subscriber at `trace` for everything (and
    /// `log` records), writing here. A test that uses it belongs in a file
    /// of its own: call sites cache whether anyone listens, so a subscriber
    /// installed after other tests ran in the same process can miss events.
    #[must_use]
    pub fn install_trace() -> Self {
        let logs = Self::default();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_writer(logs.clone())
            .with_ansi(false)
            .init();
        logs
    }

    /// Everything written so far.
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
