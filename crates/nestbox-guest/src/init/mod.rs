//! Role selection and the PID 1 stages. Owned by the boot path (stage 1, stage 2).

use std::process::ExitCode;

/// Chooses the role from argv[0], the first argument and the process id.
pub fn dispatch() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => crate::server::main(&args[2..]),
        _ => {
            eprintln!("usage: nestbox-guest serve [--listen ADDR]");
            ExitCode::from(2)
        }
    }
}
