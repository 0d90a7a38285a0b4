//! Bodies of the process, terminal and file-watch endpoints, and the terminal WebSocket's
//! message protocol ([`TerminalClientMessage`], [`TerminalServerMessage`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

#[cfg(feature = "openapi")]
use utoipa::{IntoParams, ToSchema};

/// `POST /v1/sandboxes/{id}/processes`: a process started in the background.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StartProcessRequest {
    /// A shell command line, run by `/bin/sh -c`. Give exactly one of `command` and `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// A program and its arguments, run without a shell.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Extra environment.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::env_map))]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the user's home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as (default: the template's user, root for most).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^([a-z_][a-z0-9_-]{0,31})?$"))]
    pub user: Option<String>,
    /// A name to reach the process by instead of its pid: 1–64 letters, digits, `.`, `_`
    /// or `-`, not all digits, unique among the sandbox's running processes.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = "^[A-Za-z0-9._-]*[A-Za-z._-][A-Za-z0-9._-]*$",
            max_length = 64
        )
    )]
    pub tag: Option<String>,
    /// Keep stdin open for `…/stdin` (default `false`: stdin is closed).
    #[serde(default)]
    pub stdin: bool,
}

/// `POST /v1/sandboxes/{id}/terminals`: a shell (or command) on a terminal.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StartTerminalRequest {
    /// Columns (default 80, 1–1000).
    #[serde(default)]
    pub cols: Option<u32>,
    /// Rows (default 24, 1–1000).
    #[serde(default)]
    pub rows: Option<u32>,
    /// Program and arguments (default: a login shell, `/bin/bash -l`).
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Extra environment (`TERM` defaults to `xterm-256color`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::env_map))]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the user's home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as (default: the template's user, root for most).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^([a-z_][a-z0-9_-]{0,31})?$"))]
    pub user: Option<String>,
    /// A name to reattach by; same rules as a process tag.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = "^[A-Za-z0-9._-]*[A-Za-z._-][A-Za-z0-9._-]*$",
            max_length = 64
        )
    )]
    pub tag: Option<String>,
}

/// A running process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ProcessInfo {
    /// Pid inside the sandbox.
    pub pid: u32,
    /// Its tag, if it was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Program.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Working directory, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// The running processes of a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ProcessList {
    /// Processes started through the API (and E2B's SDKs), by pid.
    pub items: Vec<ProcessInfo>,
}

/// `POST …/processes/{process}/stdin`: give exactly one of `data` and `data_base64`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProcessInputRequest {
    /// Text to write.
    #[serde(default)]
    pub data: Option<String>,
    /// Bytes to write, base64.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")
    )]
    pub data_base64: Option<String>,
}

/// A signal a process can be sent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum ProcessSignal {
    /// Ask it to end (15).
    #[serde(rename = "SIGTERM")]
    Sigterm,
    /// End it now (9).
    #[serde(rename = "SIGKILL")]
    Sigkill,
}

impl ProcessSignal {
    /// The signal's number.
    pub fn number(self) -> u32 {
        match self {
            ProcessSignal::Sigterm => 15,
            ProcessSignal::Sigkill => 9,
        }
    }
}

/// `POST …/processes/{process}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// `SIGTERM` or `SIGKILL`; the whole process group receives it.
    pub signal: ProcessSignal,
}

/// Query of `GET …/files/watch`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// Directory to watch: absolute, or relative to the user's home.
    pub path: String,
    /// Watch its subdirectories too (default `false`).
    pub recursive: Option<bool>,
    /// User whose home relative paths start from (default `root`).
    #[cfg_attr(feature = "openapi", param(pattern = "^([a-z_][a-z0-9_-]{0,31})?$"))]
    pub user: Option<String>,
}

/// One event of a directory watch (server-sent events; the SSE event name is `type`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    /// The watch is in place: changes from now on are reported. First event.
    Started,
    /// An entry was created (or moved in).
    Create {
        /// Path relative to the watched directory.
        name: String,
    },
    /// A file was written.
    Write {
        /// Path relative to the watched directory.
        name: String,
    },
    /// An entry was removed.
    Remove {
        /// Path relative to the watched directory.
        name: String,
    },
    /// An entry was renamed (or moved out).
    Rename {
        /// Path relative to the watched directory.
        name: String,
    },
    /// An entry's permissions or owner changed.
    Chmod {
        /// Path relative to the watched directory.
        name: String,
    },
    /// The watch failed. Last event.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
}

/// A text frame the client sends on a terminal WebSocket. Binary frames are keyboard input.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TerminalClientMessage {
    /// Input as text (same as a binary frame of its UTF-8 bytes).
    Input {
        /// Text to type.
        data: String,
    },
    /// The terminal's new size.
    Resize {
        /// Columns, 1–1000.
        cols: u32,
        /// Rows, 1–1000.
        rows: u32,
    },
    /// Signal the terminal's process group.
    Signal {
        /// `SIGTERM` or `SIGKILL`.
        signal: ProcessSignal,
    },
    /// Kill the terminal's processes (`SIGKILL`).
    Kill,
}

/// A text frame the server sends on a terminal WebSocket. Binary frames are terminal output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TerminalServerMessage {
    /// Attached: output from now on follows. First frame.
    Attached {
        /// The terminal's process.
        pid: u32,
    },
    /// The terminal's process exited; the server closes the socket next.
    Exit {
        /// Exit status; 128+n when killed by signal n.
        exit_code: i32,
    },
    /// A request failed (the socket stays open), or the attachment ended (it closes).
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_messages_are_tagged_json() {
        let m: TerminalClientMessage =
            serde_json::from_str(r#"{"type":"resize","cols":100,"rows":40}"#).unwrap();
        assert_eq!(
            m,
            TerminalClientMessage::Resize {
                cols: 100,
                rows: 40
            }
        );
        let m: TerminalClientMessage = serde_json::from_str(r#"{"type":"kill"}"#).unwrap();
        assert_eq!(m, TerminalClientMessage::Kill);
        let m: TerminalClientMessage =
            serde_json::from_str(r#"{"type":"signal","signal":"SIGTERM"}"#).unwrap();
        assert_eq!(
            m,
            TerminalClientMessage::Signal {
                signal: ProcessSignal::Sigterm
            }
        );
        assert!(serde_json::from_str::<TerminalClientMessage>(r#"{"type":"nope"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&TerminalServerMessage::Exit { exit_code: 0 }).unwrap(),
            r#"{"type":"exit","exit_code":0}"#
        );
        assert_eq!(
            serde_json::to_string(&WatchEvent::Create { name: "a".into() }).unwrap(),
            r#"{"type":"create","name":"a"}"#
        );
    }
}
