//! Subcommands.

pub mod agent;
pub mod bench;
pub mod bench_builds;
pub mod builds;
pub mod client;
pub mod hosts;
pub mod image;
pub mod processes;
pub mod server;
pub mod up;

/// Reads a secret token from a file (surrounding whitespace trimmed); refuses one shorter
/// than 16 characters.
pub fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.trim().to_string();
    anyhow::ensure!(
        token.len() >= 16,
        "the token in {} is shorter than 16 characters",
        path.display()
    );
    Ok(token)
}
