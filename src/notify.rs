//! Notifications: an outbox kept in the journal, and a sender that delivers it
//! in order to a webhook.
//!
//! A notification is appended to the journal in the same write as the step
//! that caused it, so a power cut or an outage loses none. The sender posts the
//! oldest undelivered one as JSON, with its idempotency id and an HMAC-SHA256
//! signature over the timestamp and the body, and records the delivery once
//! the webhook responds with 2xx. A kill between the response and that record sends
//! the same id again, so receivers drop ids they already have.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::Notify;

use crate::journal::record::{NotificationDeliveredRecord, NotificationDroppedRecord, NotificationRecord, RecordMeta};
use crate::journal::{JournalError, JournalState, Record};
use crate::machine::describe_machine;
use crate::report::format_time;
use crate::seams::Seams;

/// Header with the notification's idempotency id (32 hex digits).
pub const ID_HEADER: &str = "x-eventpi-id";
/// Header with the Unix time in seconds at which the request was signed.
pub const TIMESTAMP_HEADER: &str = "x-eventpi-timestamp";
/// Header with `sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>`.
pub const SIGNATURE_HEADER: &str = "x-eventpi-signature";

/// How much a notification matters; a full outbox drops low severities first.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Info = 1,
    Warning = 2,
    Error = 3,
}

impl Severity {
    pub fn from_code(code: u8) -> Severity {
        match code {
            1 => Severity::Info,
            2 => Severity::Warning,
            _ => Severity::Error,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// A notification about to be queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub severity: Severity,
    pub kind: &'static str,
    pub machine: u8,
    pub message: String,
}

/// Returns the records that queue `notices`, dropping entries from a full
/// outbox to make room: the oldest of the lowest severity first.
pub fn queue_records(state: &JournalState, notices: &[Notice], meta: RecordMeta, capacity: usize) -> Vec<Record> {
    let mut records = Vec::new();
    let mut outbox: Vec<(u8, [u8; 16])> = state.outbox.iter().map(|queued| (queued.severity, queued.id)).collect();
    for notice in notices {
        while capacity > 0 && outbox.len() >= capacity {
            let lowest = outbox.iter().map(|(severity, _)| *severity).min().expect("a full outbox is not empty");
            let index = outbox.iter().position(|(severity, _)| *severity == lowest).expect("the lowest severity is in the outbox");
            let (_, id) = outbox.remove(index);
            records.push(Record::NotificationDropped(NotificationDroppedRecord { meta, id }));
        }
        let id: [u8; 16] = rand::random();
        outbox.push((notice.severity as u8, id));
        records.push(Record::Notification(NotificationRecord {
            meta,
            id,
            severity: notice.severity as u8,
            kind: notice.kind.to_string(),
            machine: notice.machine,
            message: notice.message.clone(),
        }));
    }
    records
}

/// Formats a notification id as 32 hex digits.
pub fn format_id(id: &[u8; 16]) -> String {
    id.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The JSON body a webhook receives.
#[derive(Debug, Clone, Serialize)]
pub struct Payload<'a> {
    pub id: String,
    pub device: &'a str,
    /// When the event happened, RFC 3339 in UTC.
    pub time: String,
    pub clock_synced: bool,
    pub severity: &'static str,
    pub kind: &'a str,
    pub machine: String,
    pub message: &'a str,
}

/// Builds the JSON body for one queued notification.
pub fn payload_json(record: &NotificationRecord, device: &str) -> String {
    let payload = Payload {
        id: format_id(&record.id),
        device,
        time: format_time(record.meta.wall_ms),
        clock_synced: record.meta.clock_synced,
        severity: Severity::from_code(record.severity).name(),
        kind: &record.kind,
        machine: describe_machine(record.machine),
        message: &record.message,
    };
    serde_json::to_string(&payload).expect("the payload is plain strings and booleans")
}

/// Returns `sha256=<hex>` of HMAC-SHA256 over `<timestamp>.<body>`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256={hex}")
}

/// Settings of the webhook sender.
#[derive(Debug, Clone)]
pub struct SenderSettings {
    pub url: hyper::Uri,
    pub secret: Vec<u8>,
    pub device: String,
    pub timeout: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// Error of one delivery attempt.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("webhook answered {status}")]
    Status { status: hyper::StatusCode },
    #[error("webhook request failed: {0}")]
    Request(String),
    #[error("webhook did not answer within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
}

/// Delivers the outbox to the webhook until the future is dropped.
pub async fn run_sender(journal: crate::runtime::SharedJournal, seams: Seams, settings: SenderSettings, wake: Arc<Notify>) -> Result<(), JournalError> {
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let mut failures = 0u32;

    loop {
        let head = {
            let mut journal = journal.lock().expect("no code panics while holding the journal lock");
            journal.refresh()?;
            journal.state().outbox.front().cloned()
        };
        let Some(notification) = head else {
            wake.notified().await;
            continue;
        };

        let id = format_id(&notification.id);
        match deliver(&client, &settings, &notification, seams.clock.wall_ms() / 1000).await {
            Ok(()) => {
                failures = 0;
                let delivered = Record::NotificationDelivered(NotificationDeliveredRecord { meta: seams.meta(), id: notification.id });
                journal.lock().expect("no code panics while holding the journal lock").append(vec![delivered])?;
                tracing::info!(notification = %id, kind = %notification.kind, "notification delivered");
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = crate::driver::stack::backoff_delay(failures, settings.retry_min, settings.retry_max);
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(notification = %id, %error, failures, retry_in = %humantime::format_duration(delay), "notification not delivered");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wake.notified() => {}
                }
            }
        }
    }
}

async fn deliver<C>(client: &Client<C, Full<Bytes>>, settings: &SenderSettings, notification: &NotificationRecord, timestamp: u64) -> Result<(), DeliveryError>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let body = payload_json(notification, &settings.device);
    let request = Request::post(settings.url.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, concat!("eventpi-autoupdate/", env!("CARGO_PKG_VERSION")))
        .header(ID_HEADER, format_id(&notification.id))
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(SIGNATURE_HEADER, sign(&settings.secret, timestamp, body.as_bytes()))
        .body(Full::new(Bytes::from(body)))
        .map_err(|error| DeliveryError::Request(error.to_string()))?;

    let exchange = async {
        let response = client.request(request).await.map_err(|error| DeliveryError::Request(error.to_string()))?;
        let status = response.status();
        // The body is read and dropped so the connection can be reused.
        let _ = response.into_body().collect().await;
        if status.is_success() { Ok(()) } else { Err(DeliveryError::Status { status }) }
    };
    tokio::time::timeout(settings.timeout, exchange).await.map_err(|_| DeliveryError::TimedOut(settings.timeout))?
}

/// Reads a secret file, refusing one that other users can read.
pub fn read_secret(path: &PathBuf) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!("{} has mode {mode:04o}, which lets other users read it; run chmod 600 on it", path.display()));
    }
    let secret = std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let trimmed = secret.trim_ascii().to_vec();
    if trimmed.is_empty() {
        return Err(format!("{} is empty; write the webhook's shared secret into it", path.display()));
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::History;

    fn notice(severity: Severity, kind: &'static str) -> Notice {
        Notice { severity, kind, machine: 1, message: kind.to_string() }
    }

    #[test]
    fn signature_matches_known_value() {
        // HMAC-SHA256("key", "1700000000.{}"), computed with Python's hmac module.
        let signature = sign(b"key", 1_700_000_000, b"{}");
        assert_eq!(signature, "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae");
    }

    #[test]
    fn full_outbox_drops_oldest_low_severity() {
        let mut state = JournalState::new(History::Recent);
        let meta = RecordMeta::default();
        for record in queue_records(&state.clone(), &[notice(Severity::Error, "a"), notice(Severity::Info, "b"), notice(Severity::Info, "c")], meta, 3) {
            state.apply(&record);
        }

        let records = queue_records(&state, &[notice(Severity::Error, "d")], meta, 3);
        for record in &records {
            state.apply(record);
        }

        let kinds: Vec<&str> = state.outbox.iter().map(|queued| queued.kind.as_str()).collect();
        assert_eq!(kinds, vec!["a", "c", "d"]);
        assert_eq!(state.notifications_dropped, 1);
    }

    #[test]
    fn group_readable_secret_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "secret").unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o640)).unwrap();

        let error = read_secret(&file.path().to_path_buf()).unwrap_err();

        assert!(error.contains("0640"), "{error}");
        assert!(error.contains("chmod 600"), "{error}");
    }
}
