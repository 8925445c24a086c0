//! Sends bytes as one HTTP request to the handover API of a candidate, served
//! on 127.0.0.1 by the real server with its token check, body limit and
//! timeouts, over an empty journal. The server must respond to every request
//! within a bound, and it may return 200 only to a request that carries the
//! token.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use eventpi_autoupdate::journal::{Journal, JournalOptions};
use eventpi_autoupdate::machine::selfupdate::{ContainerRef, SelfUpdateSettings};
use eventpi_autoupdate::runtime::Runtime;
use eventpi_autoupdate::seams::Seams;
use eventpi_autoupdate::selfupdate::handover::{self, Candidate};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "fuzz-handover-token";

/// Longer than the server's request timeout, so only a hang exceeds it.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest response read; the server's responses are small JSON bodies.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

struct Server {
    runtime: tokio::runtime::Runtime,
    address: SocketAddr,
    _directory: tempfile::TempDir,
}

static SERVER: LazyLock<Server> = LazyLock::new(|| {
    let directory = tempfile::tempdir().expect("a temporary directory can be created");
    let options = JournalOptions { file_bytes: 64 * 1024 + 4096, sync: false, ..JournalOptions::default() };
    let journal = Journal::open(&directory.path().join("journal"), options).expect("the journal opens");
    let seams = Seams::system("/proc/sys/kernel/random/boot_id".into());
    let agent = Arc::new(Runtime::new("fuzz".into(), Arc::new(Mutex::new(journal)), seams, 16, Vec::new()));
    let own = ContainerRef { id: "c".repeat(64), name: "autoupdate-candidate".into() };
    let candidate = Candidate::new(TOKEN, own, "container:cccccccccccc".into(), None, SelfUpdateSettings::default());

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a tokio runtime starts");
    let listener = runtime.block_on(handover::listen("127.0.0.1:0".parse().expect("a valid address"))).expect("the handover API listens");
    let address = listener.local_addr().expect("the listener has an address");
    runtime.spawn(handover::serve(listener, agent, candidate));
    Server { runtime, address, _directory: directory }
});

fuzz_target!(|data: &[u8]| {
    let server = &*SERVER;
    let response = server.runtime.block_on(async {
        let mut stream = connect(server.address).await;
        // The server may close early, for example after a 401 or a 413.
        let _ = stream.write_all(data).await;
        let _ = stream.shutdown().await;
        let mut response = Vec::new();
        let read = tokio::time::timeout(RESPONSE_TIMEOUT, (&mut stream).take(MAX_RESPONSE_BYTES).read_to_end(&mut response)).await;
        assert!(read.is_ok(), "the handover API did not respond within {RESPONSE_TIMEOUT:?}");
        response
    });

    let status = response.strip_prefix(b"HTTP/1.1 ").and_then(|rest| rest.get(..3));
    if status == Some(b"200") {
        let bearer = format!("Bearer {TOKEN}");
        let has_token = data.windows(bearer.len()).any(|window| window.eq_ignore_ascii_case(bearer.as_bytes()));
        assert!(has_token, "200 to a request without the token: {}", String::from_utf8_lossy(&response));
    }
});

/// Connects to the server, retrying while the loopback ports are in use.
async fn connect(address: SocketAddr) -> tokio::net::TcpStream {
    let mut last_error = None;
    for _ in 0..50 {
        match tokio::net::TcpStream::connect(address).await {
            Ok(stream) => return stream,
            Err(error) => {
                last_error = Some(error);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    panic!("cannot connect to the handover API at {address}: {last_error:?}");
}
