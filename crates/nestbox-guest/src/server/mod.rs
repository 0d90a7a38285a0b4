//! The guest agent server (envd wire protocol). Owned by the server path.

use std::process::ExitCode;

/// Entry point of `nestbox-guest serve`.
pub fn main(_args: &[String]) -> ExitCode {
    ExitCode::SUCCESS
}
