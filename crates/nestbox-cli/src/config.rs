//! Settings of the server roles (`up`, `server`, `agent`) from outside the command line:
//! a `.env` file in the working directory, and a TOML file named by `--config FILE` (or
//! `NESTBOX_CONFIG_FILE`).
//!
//! The TOML file has a table per role (`[up]`, `[server]`, `[agent]`) whose keys are the
//! role's flag names (`database-url`, or `database_url`): one file can serve every role
//! of a machine. Precedence: the command line, then the environment (a `.env` file only
//! fills variables that are not set), then the file, then the defaults. The file is
//! applied by adding the flags it sets to the command line clap parses, so every value
//! is checked exactly like a flag, and a key that names no flag of the role is an error.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The roles that read `.env` and a config file.
const ROLES: [&str; 3] = ["up", "server", "agent"];

/// The command line with the settings of `.env` and the config file applied (unchanged
/// for other commands). `command` is the CLI's clap command.
pub fn expand(command: &clap::Command, args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(role) = args.get(1).and_then(|a| a.to_str()).map(str::to_string) else {
        return Ok(args);
    };
    if !ROLES.contains(&role.as_str()) {
        return Ok(args);
    }
    // Only the working directory's (`dotenv()` would also search its parents).
    match dotenvy::from_path(".env") {
        Ok(_) => {}
        Err(e) if e.not_found() => {}
        Err(e) => return Err(e).context("reading .env"),
    }
    let Some(file) = config_file(&args) else {
        return Ok(args);
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let Some(sub) = command.find_subcommand(&role) else {
        return Ok(args);
    };
    let settings = role_settings(&text, &role, &file)?;
    apply(sub, &role, &file, &settings, args)
}

/// `--config FILE`, `--config=FILE` or `NESTBOX_CONFIG_FILE`.
fn config_file(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(2);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("NESTBOX_CONFIG_FILE").map(PathBuf::from)
}

/// The keys of the role's table (in key order).
fn role_settings(
    text: &str,
    role: &str,
    file: &Path,
) -> anyhow::Result<Vec<(String, toml::Value)>> {
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", file.display()))?;
    for (key, value) in &doc {
        if !value.is_table() || !ROLES.contains(&key.as_str()) {
            bail!(
                "{}: `{key}` is not a role's table ([up], [server] or [agent])",
                file.display()
            );
        }
    }
    Ok(match doc.get(role) {
        Some(toml::Value::Table(t)) => t.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => Vec::new(),
    })
}

/// Adds the flags `settings` set to `args`, after the role's name.
fn apply(
    sub: &clap::Command,
    role: &str,
    file: &Path,
    settings: &[(String, toml::Value)],
    args: Vec<OsString>,
) -> anyhow::Result<Vec<OsString>> {
    let given = |long: &str| {
        args.iter().skip(2).any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{long}") || a.starts_with(&format!("--{long}="))
        })
    };
    let mut added: Vec<OsString> = Vec::new();
    for (key, value) in settings {
        let long = key.replace('_', "-");
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
        else {
            bail!(
                "{}: [{role}] `{key}` is not a flag of `nestbox {role}`",
                file.display()
            );
        };
        if long == "config" {
            bail!(
                "{}: [{role}] cannot name another config file",
                file.display()
            );
        }
        let from_env = arg
            .get_env()
            .is_some_and(|name| std::env::var_os(name).is_some());
        if given(&long) || from_env {
            continue;
        }
        let is_switch = matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
        );
        let values: Vec<String> = match value {
            toml::Value::Boolean(b) if is_switch => {
                if *b {
                    added.push(format!("--{long}").into());
                }
                continue;
            }
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Result<_, _>>(),
            other => scalar(other).map(|v| vec![v]),
        }
        .map_err(|what| anyhow::anyhow!("{}: [{role}] `{key}`: {what}", file.display()))?;
        for v in values {
            added.push(format!("--{long}={v}").into());
        }
    }
    let mut out = Vec::with_capacity(args.len() + added.len());
    let mut rest = args.into_iter();
    out.extend(rest.by_ref().take(2));
    out.extend(added);
    out.extend(rest);
    Ok(out)
}

fn scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("a {} is not a flag's value", other.type_str())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cmd() -> clap::Command {
        clap::Command::new("nestbox").subcommand(
            clap::Command::new("agent")
                .arg(clap::Arg::new("control-plane").long("control-plane"))
                .arg(
                    clap::Arg::new("clone-pool")
                        .long("clone-pool")
                        .env("NESTBOX_TEST_CONFIG_NEVER_SET"),
                )
                .arg(
                    clap::Arg::new("unconfined")
                        .long("unconfined")
                        .action(clap::ArgAction::SetTrue),
                )
                .arg(
                    clap::Arg::new("dns")
                        .long("dns")
                        .action(clap::ArgAction::Append),
                )
                .arg(clap::Arg::new("config").long("config")),
        )
    }

    fn run(toml: &str, argv: &[&str]) -> anyhow::Result<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nestbox.toml");
        std::fs::write(&file, toml).unwrap();
        let mut args: Vec<OsString> = argv.iter().map(OsString::from).collect();
        args.push("--config".into());
        args.push(file.clone().into());
        let c = cmd();
        let settings = role_settings(toml, "agent", &file)?;
        let out = apply(
            c.find_subcommand("agent").unwrap(),
            "agent",
            &file,
            &settings,
            args,
        )?;
        Ok(out
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .filter(|a| !a.contains("nestbox.toml") && a != "--config")
            .collect())
    }

    #[test]
    fn the_roles_table_becomes_flags_that_the_command_line_overrides() {
        let got = run(
            "[agent]\ncontrol-plane = \"https://cp:8080\"\nclone_pool = 2\nunconfined = true\n\
             dns = [\"10.0.0.1\", \"10.0.0.2\"]\n[server]\nlisten = \"0.0.0.0:1\"\n",
            &["nestbox", "agent", "--control-plane", "https://other:1"],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "nestbox",
                "agent",
                "--clone-pool=2",
                "--dns=10.0.0.1",
                "--dns=10.0.0.2",
                "--unconfined",
                "--control-plane",
                "https://other:1"
            ]
        );
        // A false switch adds nothing.
        let got = run("[agent]\nunconfined = false\n", &["nestbox", "agent"]).unwrap();
        assert_eq!(got, ["nestbox", "agent"]);
    }

    #[test]
    fn unknown_keys_and_tables_are_errors() {
        let e = run("[agent]\nlisten-here = 1\n", &["nestbox", "agent"]).unwrap_err();
        assert!(e.to_string().contains("`listen-here` is not a flag"), "{e}");
        let e = run("[agents]\nx = 1\n", &["nestbox", "agent"]).unwrap_err();
        assert!(e.to_string().contains("not a role's table"), "{e}");
        let e = run(
            "[agent]\ncontrol-plane = { a = 1 }\n",
            &["nestbox", "agent"],
        )
        .unwrap_err();
        assert!(e.to_string().contains("is not a flag's value"), "{e}");
        assert!(run("not toml = = 1", &["nestbox", "agent"]).is_err());
    }
}
