//! Push: one message per active device of the user.
//!
//! The development transport appends one JSON line per device to a file,
//! so a person (or a test) can see exactly what each device would get.

use std::path::PathBuf;
use std::sync::Arc;

use herald_core::ErrorClass;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::SendError;

/// One device to push to.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub device_id: &'a str,
    pub provider: &'a str,
    pub platform: &'a str,
    pub token: &'a str,
}

/// What every device receives.
#[derive(Debug, Clone, Serialize)]
pub struct PushMessage<'a> {
    /// Stable per delivery, so a client can drop a duplicate.
    pub delivery_id: &'a str,
    pub notification_id: &'a str,
    pub title: &'a str,
    pub body: &'a str,
    pub data: &'a serde_json::Value,
    pub priority: &'a str,
}

/// The outcome for one device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceResult {
    pub device_id: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The provider said the token is gone: disable the device.
    pub unregistered: bool,
}

#[derive(Clone, Debug)]
pub enum PushSender {
    /// One JSON line per device appended to a file (development).
    File { path: PathBuf, lock: Arc<Mutex<()>> },
}

#[derive(Serialize)]
struct FileLine<'a> {
    at: String,
    device_id: &'a str,
    provider: &'a str,
    platform: &'a str,
    token: &'a str,
    #[serde(flatten)]
    message: &'a PushMessage<'a>,
}

impl PushSender {
    pub fn file(path: PathBuf) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        Ok(Self::File {
            path,
            lock: Arc::new(Mutex::new(())),
        })
    }

    /// Sends to every device; the per-device results say which failed.
    pub async fn send(
        &self,
        message: &PushMessage<'_>,
        targets: &[Target<'_>],
    ) -> Result<Vec<DeviceResult>, SendError> {
        match self {
            Self::File { path, lock } => {
                let mut buf = Vec::new();
                let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                for t in targets {
                    let line = FileLine {
                        at: at.clone(),
                        device_id: t.device_id,
                        provider: t.provider,
                        platform: t.platform,
                        token: t.token,
                        message,
                    };
                    serde_json::to_writer(&mut buf, &line)
                        .map_err(|e| SendError::new(ErrorClass::Permanent, format!("encoding push: {e}")))?;
                    buf.push(b'\n');
                }
                let io = |e: std::io::Error| {
                    SendError::new(ErrorClass::Transient, format!("writing {}: {e}", path.display()))
                };
                // One write per delivery under a lock: lines of concurrent
                // deliveries never interleave.
                let _guard = lock.lock().await;
                let mut file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(io)?;
                file.write_all(&buf).await.map_err(io)?;
                file.flush().await.map_err(io)?;
                Ok(targets
                    .iter()
                    .map(|t| DeviceResult {
                        device_id: t.device_id.to_owned(),
                        ok: true,
                        error: None,
                        unregistered: false,
                    })
                    .collect())
            }
        }
    }
}
