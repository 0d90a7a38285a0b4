//! `nestbox template build FILE` and the other build commands: read a recipe file or a
//! Dockerfile, upload the archives the team does not have yet, start the build and follow
//! its log until it ends (the exit status says how it ended).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use nestbox_client::Client;
use nestbox_types::api::CreateBuildRequest;
use nestbox_types::{BuildId, BuildStatus};

use super::client::{Conn, client, print_json};

/// `nestbox template build`.
#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    conn: Conn,
    /// A recipe file (TOML) or a Dockerfile (named `Dockerfile`, `Dockerfile.*` or
    /// `*.Dockerfile`); copy sources are read from its directory.
    file: PathBuf,
    /// Template name (default: the recipe's `name`); `NAME:TAG` tags the build instead of
    /// replacing the template `NAME`.
    #[arg(long)]
    name: Option<String>,
    /// A tag for the new template (repeatable; default `default`, the template `NAME`
    /// itself). Sandboxes start from a tagged build as `NAME:TAG`.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Run every step; take nothing from the step cache.
    #[arg(long)]
    no_cache: bool,
    /// Time limit of the build, seconds (default: the recipe's, else 1800).
    #[arg(long)]
    timeout: Option<u32>,
    /// A Dockerfile's build argument, `NAME=VALUE` (repeatable).
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    build_args: Vec<String>,
    /// Print the build and return at once instead of following its log.
    #[arg(long)]
    detach: bool,
    /// User name for the registry of the recipe's image (with a password from
    /// NESTBOX_REGISTRY_PASSWORD, or typed on standard input with --registry-password-stdin).
    #[arg(long, env = "NESTBOX_REGISTRY_USERNAME")]
    registry_username: Option<String>,
    /// Read the registry password (or token) from standard input.
    #[arg(long, requires = "registry_username")]
    registry_password_stdin: bool,
}

/// The registry credentials the flags give, if any.
fn registry_auth(args: &BuildArgs) -> anyhow::Result<Option<nestbox_types::api::RegistryAuth>> {
    let Some(username) = args.registry_username.clone() else {
        return Ok(None);
    };
    let password = if args.registry_password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the registry password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        std::env::var("NESTBOX_REGISTRY_PASSWORD").context(
            "a registry user needs a password: NESTBOX_REGISTRY_PASSWORD or --registry-password-stdin",
        )?
    };
    Ok(Some(nestbox_types::api::RegistryAuth {
        username,
        password,
    }))
}

fn parse_build(s: &str) -> anyhow::Result<BuildId> {
    s.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs `template build`.
pub async fn build(args: BuildArgs) -> anyhow::Result<()> {
    let mut build_args = BTreeMap::new();
    for a in &args.build_args {
        let (k, v) = a
            .split_once('=')
            .with_context(|| format!("--build-arg `{a}` is not NAME=VALUE"))?;
        build_args.insert(k.to_string(), v.to_string());
    }
    let prepared = nestbox_recipe::load(&args.file, &build_args)
        .with_context(|| format!("reading {}", args.file.display()))?;
    for w in &prepared.warnings {
        eprintln!("warning: {w}");
    }
    let Some(named) = args.name.clone().or(prepared.name.clone()) else {
        bail!("name the template: --name NAME, or `name = \"…\"` in the recipe file");
    };
    let mut tags = args.tags.clone();
    let name = match named.split_once(':') {
        Some((name, tag)) => {
            tags.push(tag.to_string());
            name.to_string()
        }
        None => named,
    };
    let registry_auth = registry_auth(&args)?;
    let c = client(&args.conn)?;
    for a in &prepared.archives {
        if c.has_build_file(&a.hash).await? {
            eprintln!("==> {} unchanged ({})", a.source.display(), &a.hash[..12]);
            continue;
        }
        eprintln!(
            "==> uploading {} ({} bytes, {})",
            a.source.display(),
            a.data.len(),
            &a.hash[..12]
        );
        c.put_build_file(&a.hash, a.data.clone())
            .await
            .with_context(|| format!("uploading {}", a.source.display()))?;
    }
    let started = c
        .create_build(&CreateBuildRequest {
            name,
            recipe: prepared.recipe,
            timeout_sec: args.timeout.or(prepared.timeout_sec),
            no_cache: args.no_cache,
            registry_auth,
            tags,
        })
        .await?;
    if args.detach {
        return print_json(&started);
    }
    eprintln!("==> build {} of `{}`", started.id, started.name);
    follow(&c, started.id).await
}

/// Prints a build's log until it ends; fails unless it ended `ready`.
async fn follow(c: &Client, id: BuildId) -> anyhow::Result<()> {
    let began = Instant::now();
    let mut offset = 0;
    loop {
        let page = c.build_logs(id, offset).await?;
        let mut out = std::io::stdout().lock();
        for line in &page.items {
            match line.stream.as_str() {
                "stdout" => writeln!(out, "{}", line.text)?,
                "stderr" => eprintln!("{}", line.text),
                _ => eprintln!("==> {}", line.text),
            }
        }
        out.flush()?;
        offset = page.next;
        if page.done {
            break;
        }
        if page.items.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let b = c.get_build(id).await?;
    let secs = began.elapsed().as_secs_f64();
    match b.status {
        BuildStatus::Ready => {
            println!(
                "template `{}` built in {secs:.1} s ({} of {} steps from the cache)",
                b.name,
                b.cached_steps,
                b.recipe.steps.len()
            );
            Ok(())
        }
        status => bail!(
            "build {id} {status}: {}",
            b.error.unwrap_or_else(|| "no reason recorded".into())
        ),
    }
}

/// Runs `template builds`.
pub async fn list(conn: &Conn) -> anyhow::Result<()> {
    for b in client(conn)?.list_builds().await? {
        println!(
            "{}  {:<10} {:<24} {}",
            b.id,
            b.status.as_str(),
            b.name,
            b.created_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(())
}

/// Runs `template build-logs`.
pub async fn logs(conn: &Conn, build: &str) -> anyhow::Result<()> {
    follow(&client(conn)?, parse_build(build)?).await
}

/// Runs `template build-cancel`.
pub async fn cancel(conn: &Conn, build: &str) -> anyhow::Result<()> {
    let b = client(conn)?.cancel_build(parse_build(build)?).await?;
    eprintln!("cancelling build {} of `{}`", b.id, b.name);
    Ok(())
}
