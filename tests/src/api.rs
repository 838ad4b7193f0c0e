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
}
