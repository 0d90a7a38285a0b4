//! `nestbox bench`: measured figures for the README (filled in with the e2e harness).

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Runs per measurement (medians are reported).
    #[arg(long, short = 'n', default_value_t = 5)]
    pub runs: usize,
}

/// Runs the benchmarks.
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("the benchmark needs a running installation; see `make bench`")
}
