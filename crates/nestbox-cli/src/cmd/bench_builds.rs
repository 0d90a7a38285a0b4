//! `nestbox bench --only-builds`: a template build from scratch next to the same recipe
//! rebuilt after its last step changed (the other steps from the step cache), interleaved
//! run by run so that machine noise hits both alike.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nestbox_client::Client;
use nestbox_types::BuildStatus;
use nestbox_types::api::{BuildStep, CreateBuildRequest, Recipe};

/// The recipe measured: a few steps with real work, then one that names the run.
fn recipe(last: &str) -> Recipe {
    let run = |command: &str| BuildStep::Run {
        command: command.into(),
        user: None,
        cwd: None,
    };
    Recipe {
        base: Some("minimal".into()),
        steps: vec![
            run("mkdir -p /opt/app && head -c 16M /dev/urandom > /opt/app/blob"),
            run("i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done > /opt/app/list"),
            BuildStep::Env {
                vars: [("APP_HOME".to_string(), "/opt/app".to_string())].into(),
            },
            BuildStep::Workdir {
                path: "/opt/app".into(),
            },
            run(&format!("echo {last} > version.txt")),
        ],
        ..Default::default()
    }
}

/// Builds `recipe` as `name` and waits for the end; returns the wall time and how many
/// steps came from the cache.
async fn timed_build(
    client: &Client,
    name: &str,
    recipe: Recipe,
    no_cache: bool,
) -> anyhow::Result<(f64, u32)> {
    let t = Instant::now();
    let b = client
        .create_build(&CreateBuildRequest {
            name: name.into(),
            recipe,
            timeout_sec: Some(900),
            no_cache,
            registry_auth: None,
            tags: Vec::new(),
        })
        .await?;
    loop {
        let now = client.get_build(b.id).await?;
        if now.status.is_final() {
            if now.status != BuildStatus::Ready {
                bail!("build {} {}: {:?}", b.id, now.status, now.error);
            }
            return Ok((t.elapsed().as_secs_f64() * 1000.0, now.cached_steps));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cold builds against cached rebuilds, `runs` of each.
pub async fn builds(client: &Client, runs: usize) -> anyhow::Result<()> {
    let runs = runs.max(1);
    let mut cold = Vec::new();
    let mut cached = Vec::new();
    for i in 0..runs {
        let (ms, _) = timed_build(client, "bench-build", recipe(&format!("cold-{i}")), true)
            .await
            .context("a cold build")?;
        cold.push(ms);
        let (ms, from_cache) =
            timed_build(client, "bench-build", recipe(&format!("cached-{i}")), false)
                .await
                .context("a cached build")?;
        anyhow::ensure!(
            from_cache == 4,
            "the rebuild took {from_cache} steps from the cache, not 4"
        );
        cached.push(ms);
    }
    let cold = super::bench::stats(cold);
    let cached = super::bench::stats(cached);
    super::bench::row("build, 5 steps, no cache", &cold, "ms");
    super::bench::row("rebuild, last step changed (4 cached)", &cached, "ms");
    println!(
        "{:<44} {:>10.2} ×",
        "  rebuild / cold build",
        cached.median / cold.median
    );
    client.delete_snapshot("bench-build").await.ok();
    Ok(())
}
