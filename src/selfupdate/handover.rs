//! The handover API: HTTP/1.1 served by a candidate on its address in the
//! external Docker network, never on a host port.
//!
//! | method and path | response |
//! |---|---|
//! | `GET /ready` | 200 with the candidate's container id and version |
//! | `POST /handover` with [`HandoverRequest`] | 200 with [`HandoverResponse`] once the lease is taken; 409 when the journal does not show this handover |
//!
//! Every request must carry `Authorization: Bearer <token>` with the
//! one-time token the old agent put into the candidate's environment. The
//! token is compared in constant time, and a request without it gets 401
//! before its body is read. Bodies are limited to [`MAX_BODY_BYTES`] and
//! must arrive within [`REQUEST_TIMEOUT`], each connection serves one
//! request, and at most [`MAX_CONNECTIONS`] are open at once. No rejected
//! request changes anything.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::failpoint::{self, Point};
use crate::journal::JournalError;
use crate::journal::record::{LeaseRecord, Record};
use crate::machine::MachineKind;
use crate::machine::selfupdate::{Acceptance, ContainerRef, SelfUpdateEvents, SelfUpdateMachine, SelfUpdateSettings, SelfUpdateState};
use crate::model::Digest;
use crate::runtime::Runtime;
use crate::selfupdate::driver::{facts_now, step_records};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 4096;

/// Bytes of an oversized body read and dropped before the 413 response.
const DRAIN_BYTES: usize = 64 * 1024;

/// Time a client has to send its request headers and body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 8;

/// Largest response body the old agent reads, in bytes.
const MAX_RESPONSE_BYTES: usize = 16 * 1024;

type Body = BoxBody<Bytes, Infallible>;

/// Body of `POST /handover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverRequest {
    /// The old agent's lease epoch, its position in the journal.
    pub epoch: u64,
    /// The epoch the candidate is to take.
    pub offered_epoch: u64,
    /// The old agent's container id.
    pub old_container: String,
    /// The manifest digest the candidate was created from.
    pub digest: String,
}

/// Body of a successful `POST /handover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverResponse {
    pub epoch: u64,
    pub holder: String,
}

/// Body of `GET /ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyResponse {
    pub container: String,
    pub version: String,
}

/// The candidate's side of a handover.
#[derive(Debug)]
pub struct Candidate {
    /// SHA-256 of the token, so that comparisons take the same time for
    /// tokens of any length.
    token_hash: [u8; 32],
    pub own: ContainerRef,
    /// Holder name written into the lease.
    pub holder: String,
    /// Digest of the image this container runs, when the engine recorded it.
    pub running_digest: Option<Digest>,
    pub settings: SelfUpdateSettings,
}

impl Candidate {
    pub fn new(token: &str, own: ContainerRef, holder: String, running_digest: Option<Digest>, settings: SelfUpdateSettings) -> Candidate {
        Candidate { token_hash: Sha256::digest(token.as_bytes()).into(), own, holder, running_digest, settings }
    }

    /// Tells whether `presented` is the token, in time independent of where
    /// the two differ.
    fn accepts_token(&self, presented: &[u8]) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented).into();
        presented.ct_eq(&self.token_hash).into()
    }
}

/// State shared by the connections of one candidate server.
struct Shared {
    runtime: Arc<Runtime>,
    candidate: Candidate,
    /// Set once the lease was taken; later requests get 409.
    accepted: Mutex<Option<u64>>,
    done: watch::Sender<Option<u64>>,
}

/// Errors of starting the handover API.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for handovers on {address}: {source}")]
pub struct ListenError {
    pub address: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the handover API on `address`, the candidate's address in the
/// external network.
pub async fn listen(address: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(address).await.map_err(|source| ListenError { address, source })
}

/// Serves the handover API until a handover succeeds and returns the epoch
/// the candidate took. The response to that request is sent after this
/// returns, by its own connection task.
pub async fn serve(listener: TcpListener, runtime: Arc<Runtime>, candidate: Candidate) -> u64 {
    let (done, mut finished) = watch::channel(None);
    let shared = Arc::new(Shared { runtime, candidate, accepted: Mutex::new(None), done });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            changed = finished.changed() => {
                if changed.is_ok() && let Some(epoch) = *finished.borrow() {
                    return epoch;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "handover API: too many connections; closing this one");
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        serve_connection(shared, TokioIo::new(stream), peer).await;
                        drop(slot);
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "handover API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Error that closes a connection without a response.
#[derive(Debug, thiserror::Error)]
#[error("the response was dropped by a failpoint")]
struct ResponseDropped;

async fn serve_connection(shared: Arc<Shared>, io: TokioIo<tokio::net::TcpStream>, peer: SocketAddr) {
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        async move { handle(&shared, request, peer).await }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .keep_alive(false)
        .serve_connection(io, service);
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "handover connection ended with an error");
    }
}

async fn handle(shared: &Shared, request: Request<Incoming>, peer: SocketAddr) -> Result<Response<Body>, ResponseDropped> {
    if failpoint::armed("self-update", "Candidate", Point::Stall) {
        std::future::pending::<()>().await;
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = if !authorized(&shared.candidate, &request) {
        let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong handover token");
        response.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
        response
    } else {
        match (method.clone(), path.as_str()) {
            (Method::GET, "/ready") => {
                json(StatusCode::OK, &ReadyResponse { container: shared.candidate.own.id.clone(), version: env!("CARGO_PKG_VERSION").into() })
            }
            (Method::POST, "/handover") => match read_request(request).await {
                Ok(handover) => handover_response(shared, handover, peer)?,
                Err(response) => response,
            },
            (_, "/ready") => method_not_allowed("GET"),
            (_, "/handover") => method_not_allowed("POST"),
            _ => error(StatusCode::NOT_FOUND, &format!("no resource {path}; use /ready or /handover")),
        }
    };
    if response.status().is_client_error() {
        tracing::warn!(%peer, %method, path, status = response.status().as_u16(), "handover request rejected");
    }
    Ok(response)
}

fn authorized(candidate: &Candidate, request: &Request<Incoming>) -> bool {
    let Some(value) = request.headers().get(hyper::header::AUTHORIZATION) else { return false };
    let Some(token) = value.as_bytes().strip_prefix(b"Bearer ") else { return false };
    candidate.accepts_token(token)
}

async fn read_request(request: Request<Incoming>) -> Result<HandoverRequest, Response<Body>> {
    let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, read_body(request.into_body())).await {
        Err(_) => return Err(error(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time")),
        Ok(Err(response)) => return Err(response),
        Ok(Ok(bytes)) => bytes,
    };
    serde_json::from_slice(&bytes).map_err(|failure| error(StatusCode::BAD_REQUEST, &format!("invalid handover request: {failure}")))
}

/// Reads a body of at most [`MAX_BODY_BYTES`]. The rest of a larger body is
/// read and dropped up to [`DRAIN_BYTES`], because closing a connection with
/// unread data makes the kernel reset it, and the client would lose the 413
/// response.
async fn read_body(mut body: Incoming) -> Result<Vec<u8>, Response<Body>> {
    let mut bytes = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|failure| error(StatusCode::BAD_REQUEST, &format!("cannot read the request body: {failure}")))?;
        let Some(data) = frame.data_ref() else { continue };
        total += data.len();
        if total <= MAX_BODY_BYTES {
            bytes.extend_from_slice(data);
        } else if total > DRAIN_BYTES {
            break;
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, &format!("the request body is larger than {MAX_BODY_BYTES} bytes")));
    }
    Ok(bytes)
}

fn handover_response(shared: &Shared, request: HandoverRequest, peer: SocketAddr) -> Result<Response<Body>, ResponseDropped> {
    let mut accepted = shared.accepted.lock().expect("no code panics while holding the accepted flag");
    if let Some(epoch) = *accepted {
        return Ok(error(StatusCode::CONFLICT, &format!("this candidate already took the lease with epoch {epoch}")));
    }
    match accept(&shared.runtime, &shared.candidate, &request) {
        Ok(response) => {
            *accepted = Some(response.epoch);
            tracing::info!(%peer, epoch = response.epoch, old_container = %request.old_container, "took the lease from the old agent");
            // A watch channel's send fails only when every receiver is gone, and
            // then nothing waits for the epoch.
            let _ = shared.done.send(Some(response.epoch));
            if failpoint::armed("self-update", "Candidate", Point::DropResponse) {
                return Err(ResponseDropped);
            }
            Ok(json(StatusCode::OK, &response))
        }
        Err(reason) => Ok(error(StatusCode::CONFLICT, &reason)),
    }
}

/// Takes the offered lease if the journal shows exactly this handover in
/// progress, and records the step into `Probation` in the same append.
fn accept(runtime: &Runtime, candidate: &Candidate, request: &HandoverRequest) -> Result<HandoverResponse, String> {
    let digest: Digest = request.digest.parse().map_err(|error| format!("invalid digest: {error}"))?;
    if let Some(running) = candidate.running_digest
        && running != digest
    {
        return Err(format!("this container runs image {running}, not {digest}"));
    }

    let meta = runtime.seams.meta();
    let facts = facts_now(&meta, false);
    let holder = candidate.holder.clone();
    let mut journal = runtime.lock_journal();
    let result = journal.append_with(|state| {
        let reject = |message: String| Err(JournalError::Refused(message));
        if state.lease_epoch() != request.epoch {
            return reject(format!("the newest lease is epoch {}, not the old agent's epoch {}", state.lease_epoch(), request.epoch));
        }
        if request.offered_epoch != state.next_epoch() {
            return reject(format!("epoch {} cannot be taken: the next free epoch is {}", request.offered_epoch, state.next_epoch()));
        }
        let machine_state = state.machine(MachineKind::SelfUpdate.code()).and_then(|view| view.state);
        let Some((_, memory)) = state.self_update.as_ref().filter(|_| machine_state == Some(SelfUpdateState::HandingOver.code())) else {
            return reject("the journal shows no handover in progress".into());
        };
        let Some(attempt) = &memory.attempt else { return reject("the journal shows no attempt in progress".into()) };
        let expected = (attempt.candidate.as_ref().map(|own| own.id.as_str()), attempt.offered_epoch, attempt.target.old.id.as_str(), attempt.target.digest);
        if expected != (Some(candidate.own.id.as_str()), Some(request.offered_epoch), request.old_container.as_str(), digest) {
            return reject("the handover in the journal is for another container, epoch or image".into());
        }

        let mut machine = SelfUpdateMachine::restore(SelfUpdateState::HandingOver, memory.clone(), candidate.settings);
        let acceptance = Acceptance { epoch: request.offered_epoch, holder: holder.clone() };
        let step = machine.handle(SelfUpdateEvents::Accepted(acceptance), facts).map_err(|error| JournalError::Refused(error.to_string()))?;
        let mut records = vec![Record::Lease(LeaseRecord { meta, epoch: request.offered_epoch, holder: holder.clone() })];
        records.extend(step_records(meta, request.offered_epoch, &step, machine.memory()));
        Ok((records, ()))
    });
    if result.is_ok() {
        // The step into Probation is persisted here, not by the driver.
        failpoint::hit("self-update", SelfUpdateState::Probation.name(), Point::AfterPersist);
    }
    match result {
        Ok(()) => Ok(HandoverResponse { epoch: request.offered_epoch, holder }),
        Err(JournalError::Refused(reason)) => Err(reason),
        Err(other) => Err(other.to_string()),
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("responses serialize");
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("a response with a fixed status and header builds")
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

fn method_not_allowed(allowed: &'static str) -> Response<Body> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allowed}"));
    response.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static(allowed));
    response
}

/// Errors of the old agent's requests to a candidate.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the candidate at {address}: {source}")]
    Connect { address: SocketAddr, source: std::io::Error },
    #[error("the candidate at {address} did not answer within {}", humantime::format_duration(*timeout))]
    TimedOut { address: SocketAddr, timeout: Duration },
    #[error("request to the candidate at {address} failed: {detail}")]
    Protocol { address: SocketAddr, detail: String },
    #[error("the candidate at {address} answered {status}: {message}")]
    Status { address: SocketAddr, status: StatusCode, message: String },
}

/// Asks the candidate whether it serves, with the token.
pub async fn ready(address: SocketAddr, token: &str, timeout: Duration) -> Result<ReadyResponse, ClientError> {
    let body = exchange(address, token, Method::GET, "/ready", None, timeout).await?;
    serde_json::from_slice(&body).map_err(|error| ClientError::Protocol { address, detail: format!("invalid response to /ready: {error}") })
}

/// Sends the handover request and returns the candidate's response.
pub async fn hand_over(address: SocketAddr, token: &str, request: &HandoverRequest, timeout: Duration) -> Result<HandoverResponse, ClientError> {
    let payload = serde_json::to_vec(request).expect("the handover request serializes");
    let body = exchange(address, token, Method::POST, "/handover", Some(payload), timeout).await?;
    serde_json::from_slice(&body).map_err(|error| ClientError::Protocol { address, detail: format!("invalid response to /handover: {error}") })
}

async fn exchange(address: SocketAddr, token: &str, method: Method, path: &str, payload: Option<Vec<u8>>, timeout: Duration) -> Result<Bytes, ClientError> {
    let protocol = |detail: String| ClientError::Protocol { address, detail };
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, address.to_string())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(payload.unwrap_or_default())))
        .map_err(|error| protocol(error.to_string()))?;

    let call = async {
        let stream = tokio::net::TcpStream::connect(address).await.map_err(|source| ClientError::Connect { address, source })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|error| protocol(error.to_string()))?;
        tokio::spawn(async move {
            // The connection ends when the response body is read or dropped.
            let _ = connection.await;
        });
        let response = sender.send_request(request).await.map_err(|error| protocol(error.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES).collect().await.map_err(|error| protocol(error.to_string()))?.to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body).into_owned();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|value| value.get("error").and_then(|error| error.as_str()).map(str::to_string))
                .unwrap_or(text);
            return Err(ClientError::Status { address, status, message });
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| ClientError::TimedOut { address, timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate() -> Candidate {
        Candidate::new("secret-token", ContainerRef::default(), "container:x".into(), None, SelfUpdateSettings::default())
    }

    #[test]
    fn token_must_match_exactly() {
        let candidate = candidate();

        assert!(candidate.accepts_token(b"secret-token"));
        assert!(!candidate.accepts_token(b"secret-toke"));
        assert!(!candidate.accepts_token(b"secret-token "));
        assert!(!candidate.accepts_token(b""));
    }

    #[test]
    fn request_rejects_unknown_fields() {
        let text = r#"{"epoch":1,"offered_epoch":2,"old_container":"a","digest":"d","admin":true}"#;

        assert!(serde_json::from_str::<HandoverRequest>(text).is_err());
    }
}
