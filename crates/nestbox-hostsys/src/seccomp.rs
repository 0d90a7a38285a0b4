//! A seccomp filter for the confined tools that read guest-controlled images (`e2fsck`,
//! `resize2fs`, `dumpe2fs`; see [`crate::process::Cmd::confined`]): what a file-system tool
//! never needs is refused with `EPERM`, so a parser bug in one of them reaches no network,
//! no other process, no namespace, mount, key, module or BPF interface of the host kernel.
//!
//! A deny list (the tools come from the distribution, and an allow list would break with
//! their updates), built before the fork ([`ToolFilter::build`]) and installed by the child
//! just before it runs the tool ([`ToolFilter::install`]), after `no_new_privs`.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// System calls a file-system tool has no use for.
const DENIED: &[i64] = &[
    // Network (the tool's namespace has loopback only; no socket at all is simpler).
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_recvmmsg,
    // Other processes.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    // Namespaces, mounts, roots.
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    // Kernel interfaces with a record of exploits.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_personality,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_modify_ldt,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_vhangup,
];

/// The compiled filter.
#[derive(Debug, Clone)]
pub(crate) struct ToolFilter {
    program: BpfProgram,
}

/// The filter cannot be built for this machine.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the tools' seccomp filter: {0}")]
pub struct FilterError(String);

impl ToolFilter {
    /// Compiles the deny list for this machine's architecture.
    pub(crate) fn build() -> Result<Self, FilterError> {
        let arch =
            TargetArch::try_from(std::env::consts::ARCH).map_err(|e| FilterError(e.to_string()))?;
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            DENIED.iter().map(|nr| (*nr, Vec::new())).collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(|e| FilterError(e.to_string()))?;
        let program = BpfProgram::try_from(filter).map_err(|e| FilterError(e.to_string()))?;
        Ok(Self { program })
    }

    /// Installs it on the calling thread (needs `no_new_privs`). Async-signal-safe: one
    /// system call on the program built before the fork.
    pub(crate) fn install(&self) -> std::io::Result<()> {
        let prog = libc::sock_fprog {
            len: self.program.len() as libc::c_ushort,
            filter: self.program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: seccomp(2) reads `prog`, which points into `self.program` for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
