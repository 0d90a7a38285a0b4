//! `nestbox image build`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use nestbox_image::{BuildOptions, ConsoleProgress, KernelSource, Recipe};

use crate::paths;

/// Image subcommands.
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build the kernel, initramfs and template root filesystems. Cached by content: a
    /// second run with the same inputs is instant.
    Build(BuildArgs),
}

/// Arguments of `image build`.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// Output directory.
    #[arg(
        long,
        env = "NESTBOX_IMAGES_DIR",
        default_value = "/var/lib/nestbox/images"
    )]
    pub out: PathBuf,
    /// Cache for downloads and debootstrap trees (default: <out>/../image-cache).
    #[arg(long, env = "NESTBOX_IMAGE_CACHE")]
    pub cache: Option<PathBuf>,
    /// The static guest agent binary.
    #[arg(long, env = "NESTBOX_GUEST_BIN")]
    pub guest_bin: Option<PathBuf>,
    /// Debian mirror.
    #[arg(long, env = "NESTBOX_MIRROR", default_value = nestbox_image::DEFAULT_MIRROR)]
    pub mirror: String,
    /// Debian suite.
    #[arg(long, default_value = nestbox_image::DEFAULT_SUITE)]
    pub suite: String,
    /// Templates to build (minimal, python, node).
    #[arg(long, value_delimiter = ',', default_value = "minimal")]
    pub templates: Vec<String>,
    /// Use this kernel image (vmlinuz or vmlinux) instead of Debian's cloud kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Modules directory (lib/modules/<version>) matching --kernel.
    #[arg(long, requires = "kernel")]
    pub modules: Option<PathBuf>,
    /// Rebuild even if up to date.
    #[arg(long)]
    pub force: bool,
}

/// Builds images as asked.
pub async fn build(args: &BuildArgs) -> anyhow::Result<nestbox_image::BuildReport> {
    let guest = paths::guest_binary(args.guest_bin.as_deref())?;
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| args.out.parent().unwrap_or(&args.out).join("image-cache"));
    let mut opts = BuildOptions::new(&args.out, cache, guest);
    opts.mirror = args.mirror.clone();
    opts.suite = args.suite.clone();
    opts.force = args.force;
    opts.templates = args
        .templates
        .iter()
        .map(|n| {
            Recipe::builtin(n).with_context(|| {
                format!(
                    "unknown template `{n}` (known: {})",
                    Recipe::BUILTIN.join(", ")
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    if let Some(kernel) = &args.kernel {
        opts.kernel = KernelSource::Local {
            image: kernel.clone(),
            modules_dir: args.modules.clone(),
            version: None,
        };
    }
    nestbox_image::build(&opts, &ConsoleProgress)
        .await
        .context("image build failed")
}

/// Runs an image subcommand.
pub async fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Build(args) => {
            let report = build(&args).await?;
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
    }
}
