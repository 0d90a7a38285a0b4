//! `nestbox`: one binary for every role.
//!
//! Server roles: `up` (control plane + host agent in one process, embedded SQLite,
//! first-run bootstrap), `server` (control plane only), `agent` (host agent only).
//! Tools: `image build`, `openapi`, `bench`. Client: `login`, `configure`, `sandbox …`,
//! `file …`, `template list`.

mod cmd;
mod config;
mod paths;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nestbox",
    version,
    about = "Run untrusted code in microVM sandboxes",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole platform on this machine: control plane and host agent in one process.
    Up(cmd::up::UpArgs),
    /// Run the control plane only.
    Server(cmd::server::ServerArgs),
    /// Run a host agent that registers with a control plane.
    Agent(cmd::agent::AgentArgs),
    /// Build guest images (kernel, initramfs, root filesystems).
    Image {
        #[command(subcommand)]
        command: cmd::image::ImageCommand,
    },
    /// Print the OpenAPI document of the REST API.
    Openapi,
    /// Measure boot, create, exec and file transfer speeds on this machine.
    Bench(cmd::bench::BenchArgs),
    /// Log in with email and password and remember the session.
    Login(cmd::client::LoginArgs),
    /// Remember a server URL and API key.
    Configure(cmd::client::ConfigureArgs),
    /// Create, list, inspect, run commands in and destroy sandboxes.
    Sandbox {
        #[command(subcommand)]
        command: cmd::client::SandboxCommand,
    },
    /// Copy and list files inside sandboxes.
    File {
        #[command(subcommand)]
        command: cmd::client::FileCommand,
    },
    /// List templates.
    Template {
        #[command(subcommand)]
        command: cmd::client::TemplateCommand,
    },
    /// Hosts: list them, make a registration token, delete one (a user session).
    Host {
        #[command(subcommand)]
        command: cmd::hosts::HostCommand,
    },
    /// Platform administration: teams and BYOC (platform admins).
    Admin {
        #[command(subcommand)]
        command: cmd::hosts::AdminCommand,
    },
}

fn init_tracing(server: bool) {
    let default = if server {
        "info,tower_http=warn,sqlx=warn,h2=warn,hyper=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NESTBOX_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let args = match config::expand(&Cli::command(), std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let server = matches!(
        cli.command,
        Command::Up(_) | Command::Server(_) | Command::Agent(_)
    );
    init_tracing(server);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => cmd::up::run(args).await,
            Command::Server(args) => cmd::server::run(args).await,
            Command::Agent(args) => cmd::agent::run(args).await,
            Command::Image { command } => cmd::image::run(command).await,
            Command::Openapi => {
                println!("{}", nestbox_control::api::openapi_json());
                Ok(())
            }
            Command::Bench(args) => cmd::bench::run(args).await,
            Command::Login(args) => cmd::client::login(args).await,
            Command::Configure(args) => cmd::client::configure(args).await,
            Command::Sandbox { command } => cmd::client::sandbox(command).await,
            Command::File { command } => cmd::client::file(command).await,
            Command::Template { command } => cmd::client::template(command).await,
            Command::Host { command } => cmd::hosts::host(command).await,
            Command::Admin { command } => cmd::hosts::admin(command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
