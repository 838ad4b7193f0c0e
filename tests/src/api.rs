//! A client of the hypervisor's control channel (issue 19): the unix socket
//! QEMU serves for the virtio-console port (`MachineConfig::api`), one line
//! per message in each direction.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A fresh socket path for machine `name` in the temp directory (removed
/// first if a previous run left it).
pub fn socket_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("mhv-api-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// A connection to the control channel.
pub struct ApiClient {
    stream: UnixStream,
    /// Bytes received after the last complete line.
    pending: Vec<u8>,
    /// Events read while waiting for answers, oldest first.
    pub events: Vec<serde_json::Value>,
    /// Answers to other requests (an earlier connection's) read while
    /// waiting for one of ours.
    pub stray: Vec<serde_json::Value>,
    next_id: u64,
}

impl ApiClient {
    /// Connects to `path`, retrying until QEMU has created the socket or
    /// `timeout` passes.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<ApiClient> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    return Ok(ApiClient {
                        stream,
                        pending: Vec::new(),
                        events: Vec::new(),
                        stray: Vec::new(),
                        next_id: 1,
                    })
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends `line` and a newline.
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        self.send_bytes(format!("{line}\n").as_bytes())
    }

    /// Sends raw bytes (for tests of framing and garbage).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// The next line, without its newline; `Ok(None)` if none is complete
    /// within `timeout`. A line that is not UTF-8 is converted lossily.
    pub fn read_line(&mut self, timeout: Duration) -> io::Result<Option<String>> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(at) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=at).take(at).collect();
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next answer (a line with an `id`) within `timeout`, parsed;
    /// events read before it go to [`ApiClient::events`].
    pub fn answer(&mut self, timeout: Duration) -> Result<serde_json::Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .read_line(left)
                .map_err(|e| format!("api socket: {e}"))?
                .ok_or_else(|| format!("no answer within {timeout:?}"))?;
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("not JSON: {line:?}: {e}"))?;
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return Ok(v);
            }
        }
    }

    /// Sends `{"id":N,"cmd":cmd,...args}` and returns the answer's `result`,
    /// or the error answer as `Err`.
    pub fn call(
        &mut self,
        cmd: &str,
        args: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = serde_json::json!({"id": id, "cmd": cmd});
        if let (Some(req), Some(args)) = (req.as_object_mut(), args.as_object()) {
            req.extend(args.clone());
        }
        self.send_line(&req.to_string())
            .map_err(|e| format!("api socket: {e}"))?;
        // Answers to requests an earlier connection sent (and left before
        // reading) may come first: the hypervisor answers every request, and
        // the channel has no notion of connections (docs/API.md). Our ids
        // are unique, so anything else is one of those.
        let mut a = self.answer(timeout)?;
        while a["id"] != serde_json::json!(id) {
            self.stray.push(a);
            a = self.answer(timeout)?;
        }
        match a["ok"].as_bool() {
            Some(true) => Ok(a["result"].clone()),
            _ => Err(a.to_string()),
        }
    }

    /// `stats` as its fields.
    pub fn stats(&mut self, timeout: Duration) -> Result<serde_json::Value, String> {
        self.call("stats", serde_json::json!({}), timeout)
    }
}
