//! The CLI's side of the control API: one HTTP/1.1 request over the unix
//! socket or the loopback port.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// Time allowed to connect and get the response headers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Address of the running agent's control API.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(port) => write!(f, "127.0.0.1:{port}"),
        }
    }
}

/// Errors of talking to the running agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: the agent is not running.
    #[error("cannot reach the agent at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: std::io::Error },
    #[error("the agent at {endpoint} did not answer in time")]
    TimedOut { endpoint: String },
    #[error("request to the agent at {endpoint} failed: {detail}")]
    Protocol { endpoint: String, detail: String },
    /// The agent responded with an error status.
    #[error("the agent answered {status}: {message}")]
    Status { status: StatusCode, message: String },
}

/// Sends one request and returns the response with its body still streaming.
pub async fn send(endpoint: &Endpoint, method: Method, path: &str, body: Option<String>) -> Result<Response<Incoming>, ClientError> {
    let name = endpoint.to_string();
    let exchange = async {
        let protocol = |detail: String| ClientError::Protocol { endpoint: name.clone(), detail };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "autoupdate")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|error| protocol(error.to_string()))?;

        let response = match endpoint {
            Endpoint::Unix(path) => {
                let stream =
                    tokio::net::UnixStream::connect(path).await.map_err(|source| ClientError::Unreachable { endpoint: name.clone(), reason: source })?;
                exchange_on(TokioIo::new(stream), request).await
            }
            Endpoint::Tcp(port) => {
                let stream = tokio::net::TcpStream::connect(("127.0.0.1", *port))
                    .await
                    .map_err(|source| ClientError::Unreachable { endpoint: name.clone(), reason: source })?;
                exchange_on(TokioIo::new(stream), request).await
            }
        };
        response.map_err(protocol)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, exchange).await.map_err(|_| ClientError::TimedOut { endpoint: endpoint.to_string() })?
}

async fn exchange_on<S>(io: TokioIo<S>, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(|error| error.to_string())?;
    tokio::spawn(async move {
        // The connection ends when the response body is read or dropped.
        let _ = connection.await;
    });
    sender.send_request(request).await.map_err(|error| error.to_string())
}

/// Sends a request and returns the whole body, or the agent's error message.
pub async fn call(endpoint: &Endpoint, method: Method, path: &str, body: Option<String>) -> Result<String, ClientError> {
    let response = send(endpoint, method, path, body).await?;
    let status = response.status();
    let bytes =
        response.into_body().collect().await.map_err(|error| ClientError::Protocol { endpoint: endpoint.to_string(), detail: error.to_string() })?.to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|value| value.get("error").and_then(|error| error.as_str()).map(str::to_string))
            .unwrap_or(text);
        return Err(ClientError::Status { status, message });
    }
    Ok(text)
}

/// Sends a request and calls `on_line` for each line of the streamed body.
pub async fn stream_lines(endpoint: &Endpoint, path: &str, body: String, mut on_line: impl FnMut(&str)) -> Result<(), ClientError> {
    let response = send(endpoint, Method::POST, path, Some(body)).await?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body.collect().await.map(|collected| collected.to_bytes()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|value| value.get("error").and_then(|error| error.as_str()).map(str::to_string))
            .unwrap_or(text);
        return Err(ClientError::Status { status, message });
    }

    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| ClientError::Protocol { endpoint: endpoint.to_string(), detail: error.to_string() })?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            on_line(String::from_utf8_lossy(&line).trim_end());
        }
    }
    Ok(())
}
