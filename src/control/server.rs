//! The control API on a unix socket, and optionally on a loopback TCP port.
//!
//! | method and path | response |
//! |---|---|
//! | `GET /status` | the agent's status as JSON |
//! | `GET /metrics` | metrics in the Prometheus text format |
//! | `POST /update-now` with `{"process": "stack"}` or `"self"` | newline-delimited JSON progress until the run ends |
//! | `POST /button` with `{"press": "short"}` or `"long"` | a simulated press of the panel button: short checks for an update now, long arms and starts the factory reset |
//!
//! Anything else gets a 4xx response with a JSON error and changes nothing.
//! Request bodies are limited to 4 KiB and must arrive within 5 seconds.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{TcpListener, UnixListener};

use crate::runtime::{Progress, Runtime};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 4096;

/// Time a client has to send its request headers and body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest `update-now` stream; a run that takes longer keeps going, but the
/// stream ends with an error line.
const UPDATE_STREAM_LIMIT: Duration = Duration::from_secs(3600);

type Body = BoxBody<Bytes, Infallible>;

/// Errors of starting the control API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on the control socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Tcp { port: u16, source: std::io::Error },
}

/// Binds the control socket (replacing a stale one) and the optional TCP
/// port, then serves requests until the future is dropped.
pub async fn serve(runtime: Arc<Runtime>, socket: &Path, tcp_port: Option<u16>) -> Result<(), ControlError> {
    let unix = bind_unix(socket)?;
    tracing::info!(socket = %socket.display(), "control API listening");
    let tcp = match tcp_port {
        Some(port) => {
            let listener = TcpListener::bind(("127.0.0.1", port)).await.map_err(|source| ControlError::Tcp { port, source })?;
            tracing::info!(port, "control API listening on loopback");
            Some(listener)
        }
        None => None,
    };

    let unix_runtime = runtime.clone();
    let unix_loop = async move {
        loop {
            match unix.accept().await {
                Ok((stream, _)) => spawn_connection(unix_runtime.clone(), TokioIo::new(stream)),
                Err(error) => {
                    tracing::warn!(%error, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    let tcp_loop = async move {
        let Some(tcp) = tcp else { return std::future::pending::<()>().await };
        loop {
            match tcp.accept().await {
                Ok((stream, _)) => spawn_connection(runtime.clone(), TokioIo::new(stream)),
                Err(error) => {
                    tracing::warn!(%error, "control port accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    tokio::join!(unix_loop, tcp_loop);
    Ok(())
}

fn bind_unix(socket: &Path) -> Result<UnixListener, ControlError> {
    let error = |source| ControlError::Socket { path: socket.to_path_buf(), source };
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(error(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another agent is listening on it")));
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(error(source)),
    }
    let listener = UnixListener::bind(socket).map_err(error)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).map_err(error)?;
    Ok(listener)
}

fn spawn_connection<S>(runtime: Arc<Runtime>, io: TokioIo<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |request| {
            let runtime = runtime.clone();
            async move { Ok::<_, Infallible>(handle(runtime, request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new().timer(TokioTimer::new()).header_read_timeout(REQUEST_TIMEOUT).serve_connection(io, service);
        if let Err(error) = connection.await {
            tracing::debug!(%error, "control connection ended with an error");
        }
    });
}

/// Handles one request and returns its response.
pub async fn handle(runtime: Arc<Runtime>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = match (method.clone(), path.as_str()) {
        (Method::GET, "/status") => json(StatusCode::OK, &runtime.status()),
        (Method::GET, "/metrics") => {
            let text = runtime.metrics.render(&runtime.status());
            text_response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        (Method::POST, "/update-now") => match read_json::<UpdateNow>(request).await {
            Ok(update) => update_now(runtime, update).await,
            Err(response) => response,
        },
        (Method::POST, "/button") => match read_json::<ButtonPress>(request).await {
            Ok(press) => button(runtime, press),
            Err(response) => response,
        },
        (_, "/status" | "/metrics") => method_not_allowed("GET"),
        (_, "/update-now" | "/button") => method_not_allowed("POST"),
        _ => error(StatusCode::NOT_FOUND, &format!("no resource {path}; use /status, /metrics, /update-now or /button")),
    };
    if response.status().is_client_error() {
        tracing::info!(%method, path, status = response.status().as_u16(), "control request rejected");
    }
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateNow {
    process: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ButtonPress {
    press: String,
}

async fn read_json<T: serde::de::DeserializeOwned>(request: Request<Incoming>) -> Result<T, Response<Body>> {
    let limited = Limited::new(request.into_body(), MAX_BODY_BYTES);
    let collected = match tokio::time::timeout(REQUEST_TIMEOUT, limited.collect()).await {
        Err(_) => return Err(error(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time")),
        Ok(Err(failure)) if failure.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(error(StatusCode::PAYLOAD_TOO_LARGE, &format!("the request body is larger than {MAX_BODY_BYTES} bytes")));
        }
        Ok(Err(failure)) => return Err(error(StatusCode::BAD_REQUEST, &format!("cannot read the request body: {failure}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    serde_json::from_slice(&collected).map_err(|failure| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {failure}")))
}

async fn update_now(runtime: Arc<Runtime>, update: UpdateNow) -> Response<Body> {
    let machine = match update.process.as_str() {
        "stack" => "stack",
        "host" if runtime.host_patch_enabled.load(std::sync::atomic::Ordering::SeqCst) => "host-patch",
        "self" if runtime.self_update.is_enabled() => "self-update",
        "self" | "host" => {
            return error(StatusCode::CONFLICT, &format!("the {} process is not set up on this agent", update.process));
        }
        other => return error(StatusCode::BAD_REQUEST, &format!("unknown process {other:?}; use stack, self or host")),
    };
    if let Some(holder) = other_holder(&runtime) {
        return error(StatusCode::CONFLICT, &format!("this agent is passive: the lease is held by {holder}; ask that agent"));
    }

    let mut events = runtime.progress.subscribe();
    match machine {
        "host-patch" => runtime.host_wake.notify_one(),
        "self-update" => runtime.self_update.request_check(),
        _ => runtime.stack_wake.notify_one(),
    }
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + UPDATE_STREAM_LIMIT;
        loop {
            let event = match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Ok(event)) => event,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
                Err(_) => Progress::Error { message: "the run goes on, but this stream has reached its time limit".into() },
            };
            let finished = matches!(&event, Progress::Finished { machine: done, .. } if done == machine) || matches!(event, Progress::Error { .. });
            let mut line = serde_json::to_vec(&event).expect("progress events serialize");
            line.push(b'\n');
            if sender.send(Bytes::from(line)).await.is_err() || finished {
                break;
            }
        }
    });

    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), receiver))
    });
    let body = StreamBody::new(stream).boxed();
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .expect("a response with a fixed status and header builds")
}

/// Returns the holder of the newest lease when this agent does not hold it.
fn other_holder(runtime: &Runtime) -> Option<String> {
    let mut journal = runtime.lock_journal();
    if let Err(error) = journal.refresh() {
        tracing::warn!(%error, "cannot re-read the journal");
    }
    let lease = journal.state().lease.clone()?;
    (lease.epoch != journal.epoch()).then_some(lease.holder)
}

/// Duration of a simulated short press.
const SHORT_PRESS: Duration = Duration::from_millis(200);

/// Presses the panel button as a person would: the press goes through the
/// same debouncer and hold logic as the GPIO button.
fn button(runtime: Arc<Runtime>, press: ButtonPress) -> Response<Body> {
    match press.press.as_str() {
        "short" => {
            runtime.button.press_for(SHORT_PRESS);
            json(StatusCode::ACCEPTED, &serde_json::json!({ "action": "check for an update" }))
        }
        "long" => {
            let hold = runtime.button.long_press();
            runtime.button.press_for(hold);
            let action = format!("hold the button for {}: arm the factory reset, then release to start it", humantime::format_duration(hold));
            json(StatusCode::ACCEPTED, &serde_json::json!({ "action": action }))
        }
        other => error(StatusCode::BAD_REQUEST, &format!("unknown press {other:?}; use short or long")),
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).expect("responses serialize");
    text_response(status, "application/json", body)
}

fn text_response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed())
        .expect("a response with a fixed status and header builds")
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

fn method_not_allowed(allowed: &str) -> Response<Body> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allowed}"));
    response.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_str(allowed).expect("method names are valid headers"));
    response
}
