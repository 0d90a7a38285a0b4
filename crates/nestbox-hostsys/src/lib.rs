//! Host plumbing for the host agent and the image builder.
//!
//! Every privileged or external operation Nestbox performs on a host lives here, behind
//! small types with typed errors:
//!
//! - [`process`]: the one way to start a child process (records argv, kills on drop,
//!   reaps, returns exit status and a stderr tail, names the package to install when a
//!   tool is missing).
//! - [`net`]: per-sandbox network namespaces, veth/TAP, nftables isolation, slot
//!   allocation.
//! - [`disk`]: template base images expanded per disk size, qcow2 copy-on-write overlays.
//! - [`dirs`]: private directories (0700, ours, not links) for data and guest RAM.
//! - [`cgroup`]: a control group per VMM with limits from its sandbox's size (v1 or v2).
//! - [`jail`]: a private root (mount namespace, pivot_root) and an unprivileged user for
//!   one process.

pub mod cgroup;
pub mod dirs;
pub mod disk;
pub mod jail;
pub mod net;
pub mod process;
pub mod seccomp;
