//! Subcommands.

pub mod agent;
pub mod bench;
pub mod client;
pub mod hosts;
pub mod image;
pub mod processes;
pub mod server;
pub mod up;
