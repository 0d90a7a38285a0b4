//! `nestbox host` and `nestbox admin`: hosts (the platform's, or a BYOC team's own) and
//! platform administration of teams. They need a user session (`nestbox login`).

use anyhow::Context;
use clap::Subcommand;
use nestbox_types::api::DrainMoves;
use nestbox_types::{HostId, SandboxId, TeamId};

use super::client::{Conn, print_json, server_url, session_client};

/// Host subcommands.
#[derive(Subcommand)]
pub enum HostCommand {
    /// List hosts: every host (platform admins), or a BYOC team's own (`--team`).
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        conn: Conn,
        /// A team that brings its own hosts.
        #[arg(long)]
        team: Option<TeamId>,
    },
    /// Create a host and print its one-time registration token (valid one hour) with the
    /// command that registers an agent with it.
    Token {
        #[command(flatten)]
        conn: Conn,
        /// A label for the host.
        name: String,
        /// Make it a host of this BYOC team (its owners and admins may; platform admins
        /// may for any BYOC team).
        #[arg(long)]
        team: Option<TeamId>,
    },
    /// Drain a host: it takes no new sandboxes, and its paused sandboxes (`--moves all`:
    /// running ones too) move to other hosts of its pool in the background (`--undo` lets
    /// it take sandboxes again).
    Drain {
        #[command(flatten)]
        conn: Conn,
        /// The host.
        host: HostId,
        /// What moves away: none (a cordon only), paused, or all.
        #[arg(long, value_parser = parse_moves, default_value = "paused")]
        moves: DrainMoves,
        /// Let it take sandboxes again.
        #[arg(long)]
        undo: bool,
    },
    /// Move a running or paused sandbox to another host of its pool, with its processes,
    /// memory and disk (a running one is paused, moved and resumed).
    Move {
        #[command(flatten)]
        conn: Conn,
        /// The sandbox.
        sandbox: SandboxId,
        /// The host to move it to (default: the scheduler's pick).
        #[arg(long)]
        to: Option<HostId>,
    },
    /// Delete a host that holds no sandboxes (the refusal names those it holds).
    #[command(alias = "rm")]
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// The host.
        host: HostId,
        /// Destroy the sandboxes it holds first.
        #[arg(long)]
        force: bool,
        /// The BYOC team it belongs to (when you manage that team's hosts).
        #[arg(long)]
        team: Option<TeamId>,
    },
}

/// Runs a host subcommand.
pub async fn host(command: HostCommand) -> anyhow::Result<()> {
    match command {
        HostCommand::List { conn, team } => {
            let c = session_client(&conn)?;
            let hosts = match team {
                Some(team) => c.list_team_hosts(team).await?.items,
                None => c.list_hosts().await?.items,
            };
            for h in hosts {
                println!(
                    "{:<42} {:<20} {:<12} {:<28} {}",
                    h.id,
                    h.name,
                    h.status.as_str(),
                    h.address.as_deref().unwrap_or("-"),
                    h.team_name.as_deref().unwrap_or("platform")
                );
            }
            Ok(())
        }
        HostCommand::Token { conn, name, team } => {
            let c = session_client(&conn)?;
            let created = match team {
                Some(team) => c.create_team_host(team, &name).await?,
                None => c.create_host(&name).await?,
            };
            println!("host:     {}", created.host.id);
            println!("token:    {}", created.registration_token);
            println!("expires:  {}", created.expires_at);
            println!(
                "register: nestbox agent --control-plane {} --register-token {}",
                server_url(&conn),
                created.registration_token
            );
            Ok(())
        }
        HostCommand::Drain {
            conn,
            host,
            moves,
            undo,
        } => {
            let drain = session_client(&conn)?
                .drain_host(host, !undo, moves)
                .await?;
            println!(
                "{} {}",
                drain.host.id,
                if drain.host.draining {
                    "draining: takes no new sandboxes"
                } else {
                    "takes sandboxes"
                }
            );
            for id in &drain.moving {
                println!("moving {id}");
            }
            Ok(())
        }
        HostCommand::Move { conn, sandbox, to } => {
            let sb = session_client(&conn)?.move_sandbox(sandbox, to).await?;
            println!(
                "{} {} on host {}",
                sb.id,
                sb.status,
                sb.host_id.map(|h| h.to_string()).unwrap_or_default()
            );
            Ok(())
        }
        HostCommand::Delete {
            conn,
            host,
            force,
            team,
        } => {
            let c = session_client(&conn)?;
            match (team, force) {
                (Some(team), false) => c.delete_team_host(team, host).await,
                (Some(team), true) => c.force_delete_team_host(team, host).await,
                (None, false) => c.delete_host(host).await,
                (None, true) => c.force_delete_host(host).await,
            }
            .inspect_err(|e| {
                if let nestbox_client::ClientError::Api { body, .. } = e {
                    for id in &body.error.sandbox_ids {
                        eprintln!("holds {id}");
                    }
                }
            })
            .with_context(|| format!("deleting {host} (--force destroys its sandboxes)"))?;
            println!("deleted {host}");
            Ok(())
        }
    }
}

/// Platform administration.
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Teams.
    Team {
        #[command(subcommand)]
        command: AdminTeamCommand,
    },
}

/// `nestbox admin team …`.
#[derive(Subcommand)]
pub enum AdminTeamCommand {
    /// Every team, with whether it brings its own hosts.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Let a team bring its own hosts (`on`), or stop it once it has none (`off`).
    Byoc {
        #[command(flatten)]
        conn: Conn,
        /// The team.
        team: TeamId,
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

/// Runs an admin subcommand.
pub async fn admin(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Team {
            command: AdminTeamCommand::List { conn },
        } => {
            for t in session_client(&conn)?.list_all_teams().await?.items {
                println!(
                    "{:<42} {:<24} {:<5} {:>3} members {:>3} hosts",
                    t.id,
                    t.name,
                    if t.is_byoc { "byoc" } else { "-" },
                    t.members,
                    t.hosts
                );
            }
            Ok(())
        }
        AdminCommand::Team {
            command: AdminTeamCommand::Byoc { conn, team, state },
        } => {
            let t = session_client(&conn)?
                .set_team_byoc(team, state == "on")
                .await?;
            print_json(&t)
        }
    }
}

/// `--moves` off the command line.
fn parse_moves(s: &str) -> Result<DrainMoves, String> {
    match s {
        "none" => Ok(DrainMoves::None),
        "paused" => Ok(DrainMoves::Paused),
        "all" => Ok(DrainMoves::All),
        other => Err(format!("`{other}`: expected none, paused or all")),
    }
}
