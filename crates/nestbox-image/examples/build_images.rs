//! Builds the guest images (kernel + initramfs, `minimal` template) so CI and the VM
//! tests have them before the `nestbox image build` command exists.
//!
//! ```text
//! cargo run -p nestbox-image --example build_images -- OUT_DIR GUEST_BINARY [TEMPLATE…]
//! ```
//!
//! The cache defaults to `OUT_DIR/../nestbox-image-cache` (`NESTBOX_IMAGE_CACHE`
//! overrides it); `NESTBOX_MIRROR` and `NESTBOX_SUITE` override the Debian source.

use anyhow::{Context, bail};
use nestbox_image::{BuildOptions, ConsoleProgress, Recipe};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!(
            "usage: build_images OUT_DIR GUEST_BINARY [TEMPLATE…] (templates: {})",
            Recipe::BUILTIN.join(", ")
        );
    }
    let out = std::path::PathBuf::from(&args[0]);
    let cache = match std::env::var_os("NESTBOX_IMAGE_CACHE") {
        Some(c) => c.into(),
        None => out.parent().unwrap_or(&out).join("nestbox-image-cache"),
    };
    let mut opts = BuildOptions::new(&out, cache, &args[1]);
    if let Ok(m) = std::env::var("NESTBOX_MIRROR") {
        opts.mirror = m;
    }
    if let Ok(s) = std::env::var("NESTBOX_SUITE") {
        opts.suite = s;
    }
    if args.len() > 2 {
        opts.templates = args[2..]
            .iter()
            .map(|n| Recipe::builtin(n).with_context(|| format!("unknown template {n}")))
            .collect::<anyhow::Result<_>>()?;
    }
    let report = nestbox_image::build(&opts, &ConsoleProgress)
        .await
        .context("image build failed")?;
    let k = &report.kernel.image;
    println!(
        "kernel    {} -> {}",
        k.manifest.kernel_version,
        k.dir.display()
    );
    for t in &report.templates {
        println!(
            "template  {} -> {} ({} MiB)",
            t.image.manifest.name,
            t.image.rootfs.display(),
            t.image.manifest.size_bytes >> 20
        );
    }
    if report.all_cached() {
        println!(
            "everything was up to date ({:.1}s)",
            report.elapsed.as_secs_f64()
        );
    } else {
        println!("built in {:.1}s", report.elapsed.as_secs_f64());
    }
    Ok(())
}
