//! The development transport: one JSON line per device appended to a file,
//! so a person (or a test) can see exactly what each device would get.

use std::path::PathBuf;

use herald_core::{DevicePlatform, ErrorClass, PushProvider};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{DeviceResult, PushMessage, Target};
use crate::SendError;

#[derive(Debug)]
pub(crate) struct FileSink {
    path: PathBuf,
    /// One write per delivery under this lock: lines of concurrent
    /// deliveries never interleave.
    lock: Mutex<()>,
}

#[derive(Serialize)]
struct FileLine<'a> {
    at: String,
    device_id: &'a str,
    provider: PushProvider,
    platform: DevicePlatform,
    token: &'a str,
    #[serde(flatten)]
    message: &'a PushMessage<'a>,
}

impl FileSink {
    pub(crate) fn new(path: PathBuf) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        Ok(Self {
            path,
            lock: Mutex::new(()),
        })
    }

    pub(crate) async fn send(
        &self,
        message: &PushMessage<'_>,
        targets: &[Target<'_>],
    ) -> Result<Vec<DeviceResult>, SendError> {
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
        let path = &self.path;
        let io = |e: std::io::Error| SendError::new(ErrorClass::Transient, format!("writing {}: {e}", path.display()));
        let _guard = self.lock.lock().await;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(io)?;
        file.write_all(&buf).await.map_err(io)?;
        file.flush().await.map_err(io)?;
        Ok(targets.iter().map(|t| DeviceResult::sent(t.device_id)).collect())
    }
}
