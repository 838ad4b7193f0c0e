//! Requests: a JSON object's fields laid out as a console command's words,
//! then parsed by `hypcmd::parse` (one parser, one set of checks).

use crate::{ErrorCode, VERSION};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hypcmd::Command;
use serde_json::{Map, Value};

/// The longest string `id` accepted (a number is always accepted).
pub const MAX_ID_LEN: usize = 128;

/// A request the hypervisor can execute.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The client's id, echoed in the answer: a number or a short string.
    pub id: Value,
    /// What to do.
    pub cmd: Command,
}

/// A request line that was refused. `id` is the request's id if it had a
/// usable one (so the client can match the answer), `null` otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestError {
    /// The id to answer with.
    pub id: Value,
    /// Why.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

/// How a field becomes a console word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A VM id: a non-negative integer.
    Vm,
    /// A count or size: a non-negative integer, written in decimal.
    Dec,
    /// An address: a non-negative integer, or a `"0x..."` string, written in hex.
    Addr,
    /// A keyword (`"linux"`, `"group"`): a string with no whitespace, as is.
    Word,
    /// An optional count written after its flag (`--mem 512`); flags and
    /// tails may be left out independently of each other.
    Flag(&'static str),
    /// An optional string written after its flag as the rest of the line
    /// (`--cmdline console=ttyAMA0 quiet`); last in its signature.
    Tail(&'static str),
    /// A snapshot name: a string of one word (`hypcmd` checks it).
    Name,
    /// An optional name given on the console after this option word
    /// (`"parent": "a"` is `--diff a`).
    Opt(&'static str),
    /// A boolean that is true unless given false, which the console spells
    /// with this option word (`"prefetch": false` is `--no-prefetch`).
    Unless(&'static str),
}

impl Kind {
    /// Written with a flag word: may be left out whatever comes after it.
    fn flagged(self) -> bool {
        matches!(
            self,
            Kind::Flag(_) | Kind::Tail(_) | Kind::Opt(_) | Kind::Unless(_)
        )
    }
}

/// One argument: its field name, kind, and whether it may be left out
/// (optional arguments come last, as on the console).
#[derive(Clone, Copy, Debug)]
struct Arg(&'static str, Kind, bool);

const VM: Arg = Arg("vm", Kind::Vm, false);
const COUNT: Arg = Arg("count", Kind::Dec, true);
const START: Arg = Arg("start", Kind::Addr, false);
const END: Arg = Arg("end", Kind::Addr, false);
const BATCH: Arg = Arg("batch", Kind::Dec, true);

/// The commands the control channel takes, each with its fields in the order
/// of the console's words. Console-only commands (`console`, `wait`,
/// `sleep`, `chaos`, `bench`) are not here: they hold the keyboard, the
/// script or CPU 0 for a long time. A name may be several console words
/// (`"disk sum"`): the command and its subcommand.
const SIGNATURES: &[(&str, &[Arg])] = &[
    ("help", &[]),
    ("vms", &[]),
    ("stats", &[]),
    ("quit", &[]),
    ("pause", &[VM]),
    ("resume", &[VM]),
    ("destroy", &[VM]),
    ("fork", &[VM, COUNT]),
    ("snapshot", &[VM, COUNT]),
    ("restore", &[VM, Arg("snapshot", Kind::Vm, false)]),
    ("rmap", &[Arg("pa", Kind::Addr, false)]),
    ("migrate", &[VM, START, END, BATCH]),
    ("evacuate", &[START, END, BATCH]),
    ("online", &[START, END]),
    ("reclaim", &[Arg("pages", Kind::Dec, false), BATCH]),
    // The hypervisor's disk (issue 17).
    ("disk", &[]),
    ("disk sum", &[LBA, SECTORS]),
    ("disk fill", &[LBA, SECTORS, Arg("seed", Kind::Dec, false)]),
    // Independent VMs and trust groups (issue 16).
    (
        "create",
        &[
            Arg("guest", Kind::Word, false),
            Arg("mem", Kind::Flag("--mem"), true),
            Arg("vcpus", Kind::Flag("--vcpus"), true),
            Arg("cmdline", Kind::Tail("--cmdline"), true),
        ],
    ),
    // `merge` alone is a pass; with op "group" it moves a VM.
    (
        "merge",
        &[
            Arg("op", Kind::Word, true),
            Arg("vm", Kind::Vm, true),
            Arg("group", Kind::Dec, true),
        ],
    ),
    ("merge auto", &[Arg("rate", Kind::Dec, false)]),
    ("merge off", &[]),
    ("merge list", &[COUNT]),
    // Snapshots on the disk (issue 17).
    (
        "save",
        &[VM, NAME, Arg("parent", Kind::Opt("--diff"), true)],
    ),
    (
        "load",
        &[NAME, Arg("prefetch", Kind::Unless("--no-prefetch"), true)],
    ),
    ("images", &[]),
    ("delete", &[NAME]),
];

const NAME: Arg = Arg("name", Kind::Name, false);

const LBA: Arg = Arg("lba", Kind::Dec, false);
const SECTORS: Arg = Arg("sectors", Kind::Dec, false);

/// Fields every request may have besides its arguments.
const RESERVED: [&str; 3] = ["id", "v", "cmd"];

fn refuse(id: &Value, code: ErrorCode, message: String) -> RequestError {
    RequestError {
        id: id.clone(),
        code,
        message,
    }
}

/// Parses one request line (without its newline). Total: any string gives a
/// request or an error, never a panic (serde_json limits nesting to 128).
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| refuse(&Value::Null, ErrorCode::BadJson, format!("not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(refuse(
            &Value::Null,
            ErrorCode::BadRequest,
            "a request is a JSON object".into(),
        ));
    };
    let id = request_id(&obj)?;
    match obj.get("v") {
        None => {}
        Some(v) if v.as_u64() == Some(VERSION) => {}
        Some(v) => {
            let msg = format!("protocol version {v} is not supported (this is {VERSION})");
            return Err(refuse(&id, ErrorCode::Version, msg));
        }
    }
    let Some(name) = obj.get("cmd").and_then(Value::as_str) else {
        return Err(refuse(
            &id,
            ErrorCode::BadRequest,
            "missing \"cmd\" (a string)".into(),
        ));
    };
    let Some(&(name, args)) = SIGNATURES.iter().find(|(n, _)| *n == name) else {
        let msg = format!("unknown command {:?} (see docs/API.md)", Truncated(name));
        return Err(refuse(&id, ErrorCode::UnknownCommand, msg));
    };
    let words = words(name, args, &obj).map_err(|m| refuse(&id, ErrorCode::BadArgument, m))?;
    match hypcmd::parse(&words.join(" ")) {
        Ok(Some(cmd)) => Ok(Request { id, cmd }),
        Ok(None) => Err(refuse(&id, ErrorCode::BadRequest, "empty command".into())),
        Err(e) => Err(refuse(&id, ErrorCode::BadArgument, e.to_string())),
    }
}

/// The `id`: a number, or a string of at most [`MAX_ID_LEN`] bytes.
fn request_id(obj: &Map<String, Value>) -> Result<Value, RequestError> {
    match obj.get("id") {
        Some(id @ Value::Number(_)) => Ok(id.clone()),
        Some(Value::String(s)) if s.len() <= MAX_ID_LEN => Ok(Value::String(s.clone())),
        Some(_) => Err(refuse(
            &Value::Null,
            ErrorCode::BadRequest,
            format!("\"id\" must be a number or a string of at most {MAX_ID_LEN} bytes"),
        )),
        None => Err(refuse(
            &Value::Null,
            ErrorCode::BadRequest,
            "missing \"id\"".into(),
        )),
    }
}

/// The console words for `name` with `args` taken from `obj`'s fields.
fn words(name: &str, args: &[Arg], obj: &Map<String, Value>) -> Result<Vec<String>, String> {
    if let Some(extra) = obj
        .keys()
        .find(|k| !RESERVED.contains(&k.as_str()) && !args.iter().any(|a| a.0 == k.as_str()))
    {
        return Err(format!(
            "unexpected field {:?} for {name:?}",
            Truncated(extra)
        ));
    }
    let mut words = Vec::with_capacity(args.len() + 1);
    words.push(String::from(name));
    let mut left_out = None;
    for &Arg(field, kind, optional) in args {
        match (obj.get(field), optional) {
            (None, true) if kind.flagged() => {}
            (None, true) => left_out = Some(field),
            (None, false) => return Err(format!("missing field {field:?}")),
            (Some(_), _) if left_out.is_some() && !kind.flagged() => {
                return Err(format!(
                    "{field:?} needs {:?} too",
                    left_out.unwrap_or_default()
                ))
            }
            (Some(v), _) => {
                if let Kind::Flag(flag) | Kind::Tail(flag) = kind {
                    words.push(String::from(flag));
                }
                words.push(word(field, kind, v)?);
            }
        }
    }
    Ok(words)
}

/// One field as a console word.
fn word(field: &str, kind: Kind, v: &Value) -> Result<String, String> {
    match (kind, v) {
        (Kind::Vm | Kind::Dec | Kind::Flag(_), Value::Number(n)) if n.as_u64().is_some() => {
            Ok(n.to_string())
        }
        // One word: whitespace would smuggle in more arguments.
        (Kind::Word, Value::String(s)) if !s.is_empty() && !s.chars().any(char::is_whitespace) => {
            Ok(s.clone())
        }
        (Kind::Word, _) => Err(format!(
            "{field:?} must be one word (a string without spaces)"
        )),
        // The rest of the line: its words are the value, whatever they say.
        (Kind::Tail(_), Value::String(s)) => Ok(s.clone()),
        (Kind::Tail(_), _) => Err(format!("{field:?} must be a string")),
        (Kind::Addr, Value::Number(n)) => match n.as_u64() {
            Some(a) => Ok(format!("{a:#x}")),
            None => Err(format!(
                "{field:?} must be a non-negative integer or a \"0x...\" string"
            )),
        },
        (Kind::Addr, Value::String(s))
            if s.starts_with("0x")
                && s.len() <= 18
                && s.bytes().skip(2).all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(s.clone())
        }
        (Kind::Addr, _) => Err(format!(
            "{field:?} must be a non-negative integer or a \"0x...\" string"
        )),
        (Kind::Name, Value::String(s)) if one_word(s) => Ok(s.clone()),
        (Kind::Opt(flag), Value::String(s)) if one_word(s) => Ok(format!("{flag} {s}")),
        (Kind::Name | Kind::Opt(_), _) => Err(format!("{field:?} must be a name (a string)")),
        (Kind::Unless(_), Value::Bool(true)) => Ok(String::new()),
        (Kind::Unless(flag), Value::Bool(false)) => Ok(String::from(flag)),
        (Kind::Unless(_), _) => Err(format!("{field:?} must be true or false")),
        _ => Err(format!("{field:?} must be a non-negative integer")),
    }
}

/// A string that stays one console word (`hypcmd` checks the rest).
fn one_word(s: &str) -> bool {
    !s.is_empty() && !s.contains(char::is_whitespace)
}

/// At most 64 characters of a client's string, for messages.
struct Truncated<'a>(&'a str);

impl core::fmt::Debug for Truncated<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut end = self.0.len().min(64);
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{:?}", self.0.get(..end).unwrap_or_default())
    }
}

/// The request line for `cmd` with `id`, or `None` if the channel does not
/// take that command. `parse_request` of the line gives `cmd` back.
pub fn request_line(id: &Value, cmd: &Command) -> Option<String> {
    let text = cmd.to_string();
    // The longest name the text starts with, as whole words (`disk sum`
    // before `disk`).
    let &(name, args) = SIGNATURES
        .iter()
        .filter(|(n, _)| {
            text.strip_prefix(n)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        })
        .max_by_key(|(n, _)| n.len())?;
    let mut words = text[name.len()..].split_whitespace();
    let mut obj = Map::new();
    obj.insert("v".into(), VERSION.into());
    obj.insert("id".into(), id.clone());
    obj.insert("cmd".into(), name.into());
    // Positional words in order, then flags in any order.
    let mut positional = args.iter().filter(|a| !a.1.flagged());
    while let Some(w) = words.next() {
        let flag = args.iter().find(|a| {
            matches!(a.1, Kind::Flag(f) | Kind::Tail(f) | Kind::Opt(f) | Kind::Unless(f) if f == w)
        });
        let (field, value) = match flag {
            Some(&Arg(field, Kind::Tail(_), _)) => {
                let rest: Vec<&str> = words.by_ref().collect();
                (field, Value::from(rest.join(" ")))
            }
            Some(&Arg(field, Kind::Opt(_), _)) => (field, Value::from(words.next()?)),
            Some(&Arg(field, Kind::Unless(_), _)) => (field, Value::from(false)),
            Some(&Arg(field, _, _)) => (field, Value::from(words.next()?.parse::<u64>().ok()?)),
            None => {
                let &Arg(field, kind, _) = positional.next()?;
                (field, positional_value(kind, w)?)
            }
        };
        obj.insert(field.into(), value);
    }
    serde_json::to_string(&Value::Object(obj)).ok()
}

/// A positional console word as its request field's value.
fn positional_value(kind: Kind, w: &str) -> Option<Value> {
    match kind {
        Kind::Addr => u64::from_str_radix(w.trim_start_matches("0x"), 16)
            .ok()
            .map(Value::from),
        Kind::Vm | Kind::Dec => w.parse::<u64>().ok().map(Value::from),
        Kind::Word | Kind::Name => Some(Value::from(w)),
        Kind::Flag(_) | Kind::Tail(_) | Kind::Opt(_) | Kind::Unless(_) => None,
    }
}
