//! `mhvctl`: the hypervisor's command-line client. It speaks the control
//! channel's protocol (`hypapi`, `docs/API.md`) over the unix socket QEMU
//! makes of the channel (`cargo xtask run --api PATH`).
//!
//! `mhvctl --api PATH [--json] [--timeout SECS] <command words>` takes the
//! console's syntax (`fork 1 4`, `stats`, `migrate 1 0x40000000 0x40100000`),
//! checks it with the console's parser before sending, and prints the answer
//! as the console would (its tables and lines), or the answer line itself
//! with `--json`. `mhvctl --api PATH events` prints events as they come.
//! The exit status is 0 for an answer with `"ok":true`, 1 for an error
//! answer, 2 for a usage or connection failure.

use hypapi::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub struct Args {
    /// The channel's socket.
    pub api: PathBuf,
    /// Print answer lines as they are (for programs).
    pub json: bool,
    /// How long to wait for the answer.
    pub timeout: Duration,
    /// `None`: follow events.
    pub command: Option<hypcmd::Command>,
}

/// Parses the arguments after the program name.
pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut api = std::env::var_os("MHV_API").map(PathBuf::from);
    let (mut json, mut timeout) = (false, Duration::from_secs(60));
    let mut it = args.iter();
    let mut words = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--api" => api = Some(it.next().ok_or("--api needs a socket path")?.into()),
            "--json" => json = true,
            "--timeout" => {
                let s = it.next().ok_or("--timeout needs seconds")?;
                timeout =
                    Duration::from_secs(s.parse().map_err(|_| format!("bad --timeout {s:?}"))?);
            }
            w => words.push(w.to_string()),
        }
    }
    let api = api.ok_or("no socket: give --api PATH (or set MHV_API)")?;
    let command = match words.as_slice() {
        [one] if one == "events" => None,
        _ => match hypcmd::parse(&words.join(" ")) {
            Ok(Some(cmd)) => Some(cmd),
            Ok(None) => {
                return Err(format!(
                    "usage: mhvctl --api PATH [--json] <command>\n{}",
                    hypcmd::HELP
                ))
            }
            Err(e) => return Err(e.to_string()),
        },
    };
    Ok(Args {
        api,
        json,
        timeout,
        command,
    })
}

/// A connection to the channel.
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    /// Connects to the channel's socket.
    pub fn connect(path: &std::path::Path) -> Result<Client, String> {
        let s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        Ok(Client {
            writer: s,
            reader,
            next_id: 1,
        })
    }

    /// Sends `cmd` and returns its answer (events that arrive first go to
    /// `on_event`).
    pub fn request(
        &mut self,
        cmd: &hypcmd::Command,
        timeout: Duration,
        on_event: &mut dyn FnMut(&str),
    ) -> Result<(String, Value), String> {
        let id = Value::from(self.next_id);
        self.next_id += 1;
        let line = hypapi::request_line(&id, cmd).ok_or_else(|| {
            format!("`{cmd}` is a console-only command (not on the control channel)")
        })?;
        writeln!(self.writer, "{line}").map_err(|e| format!("send: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let (text, v) = self.read(deadline)?;
            if v.get("event").is_some() {
                on_event(&text);
            } else if v.get("id") == Some(&id) || v.get("id") == Some(&Value::Null) {
                return Ok((text, v));
            }
        }
    }

    /// The next line as text and JSON, before `deadline`.
    pub fn read(&mut self, deadline: Instant) -> Result<(String, Value), String> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the hypervisor closed the channel".into()),
            Ok(_) => {
                let line = line.trim_end().to_string();
                let v =
                    serde_json::from_str(&line).map_err(|e| format!("bad answer {line:?}: {e}"))?;
                Ok((line, v))
            }
            Err(e) => Err(format!("no answer: {e}")),
        }
    }
}

/// The answer as people read it: the console's lines, or the error.
pub fn render(answer: &Value) -> (String, bool) {
    if answer.get("ok") == Some(&Value::Bool(true)) {
        let text = answer
            .pointer("/result/text")
            .and_then(Value::as_array)
            .map(|lines| {
                lines
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        (text, true)
    } else {
        let code = answer
            .pointer("/error/code")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let msg = answer
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("");
        (format!("error ({code}): {msg}"), false)
    }
}
