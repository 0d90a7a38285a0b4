//! `nestbox-guest`: the agent inside every sandbox VM.
//!
//! One static binary, three roles chosen at start-up:
//!
//! - **stage 1** (`/init` in the initramfs, PID 1): loads the virtio modules, mounts the root
//!   disk and switches root to it, then execs itself from the root filesystem — see
//!   [`init::stage1`].
//! - **stage 2** (PID 1 in the root filesystem): mounts, hostname, network and clock from
//!   the kernel command line, grows the root filesystem to the disk, then runs the server as
//!   a child, restarts it if it dies, and reaps orphaned processes — see [`init::stage2`].
//! - **serve**: the HTTP/Connect server on port 49983 that speaks E2B's envd protocol — see
//!   [`server`]. It also runs as an ordinary process on a host, which is how most of its
//!   tests run.

mod init;
mod server;

fn main() -> std::process::ExitCode {
    init::dispatch()
}
