//! Host plumbing for the host agent and the image builder.
//!
//! Every privileged or external operation Nestbox performs on a host lives here, behind
//! small types with typed errors:
//!
//! - [`process`]: the one way to start a child process (records argv, kills on drop,
//!   reaps, returns exit status and a stderr tail, names the package to install when a
//!   tool is missing).

pub mod process;
