//! Where a command's answer goes: printed on the console, or gathered as
//! structured fields for the control channel (`api`). A command says each
//! line once and sets each number once, in the same place, so the two
//! syntaxes cannot drift apart.

use alloc::string::String;
use core::fmt;
use hypapi::{Map, Value};

/// A command's answer under construction.
pub struct Reply {
    /// Gathered for the control channel (else printed as it comes).
    api: bool,
    fields: Map<String, Value>,
}

impl Reply {
    /// Lines go to the console as they are said; fields are dropped.
    pub fn console() -> Reply {
        Reply {
            api: false,
            fields: Map::new(),
        }
    }

    /// Lines and fields are kept for one answer (lines in `text`).
    pub fn api() -> Reply {
        Reply {
            api: true,
            fields: Map::new(),
        }
    }

    /// A line for people: printed on the console, appended to `text` on the
    /// channel.
    pub fn say(&mut self, line: fmt::Arguments<'_>) {
        if self.api {
            self.push("text", alloc::fmt::format(line));
        } else {
            crate::println!("{line}");
        }
    }

    /// A structured field of the answer (channel only).
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        if self.api {
            self.fields.insert(key.into(), value.into());
        }
    }

    /// Appends to the array field `key` (channel only).
    pub fn push(&mut self, key: &str, value: impl Into<Value>) {
        if !self.api {
            return;
        }
        let slot = self
            .fields
            .entry(String::from(key))
            .or_insert_with(|| Value::Array(alloc::vec::Vec::new()));
        if let Value::Array(items) = slot {
            items.push(value.into());
        }
    }

    /// The fields gathered (the answer's `result`).
    pub fn into_fields(self) -> Map<String, Value> {
        self.fields
    }
}

/// `say!(r, "...", args)`: [`Reply::say`] with `format!` syntax.
#[macro_export]
macro_rules! say {
    ($r:expr, $($arg:tt)*) => {
        $r.say(format_args!($($arg)*))
    };
}
