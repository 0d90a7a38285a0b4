//! Command line of `nestbox-guest serve`, parsed by hand to keep the static binary lean.

use std::net::SocketAddr;

/// Usage text.
pub const USAGE: &str = "usage: nestbox-guest serve [--listen ADDR] [--access-token-sha256 HEX] \
[--default-user NAME] [--manage-system]";

/// The port E2B's SDKs expect the agent on.
const DEFAULT_LISTEN: &str = "0.0.0.0:49983";

/// What `serve` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeArgs {
    /// Where to listen.
    pub listen: SocketAddr,
    /// SHA-256 of the only token the first `/init` may set.
    pub access_token_sha256: Option<[u8; 32]>,
    /// The user of requests that name none (until `/init` changes it).
    pub default_user: Option<String>,
    /// Whether `/init` may set the clock and the host name (inside a VM).
    pub manage_system: bool,
}

/// A command line that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    /// An option this command does not have.
    #[error("unknown argument {0:?}")]
    Unknown(String),
    /// An option without its value.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// `--listen` is not an address.
    #[error("--listen {0:?} is not an address like 0.0.0.0:49983")]
    Listen(String),
    /// `--access-token-sha256` is not 64 hex digits.
    #[error("--access-token-sha256 must be 64 hex digits")]
    TokenHash,
    /// `--default-user` is empty.
    #[error("--default-user must not be empty")]
    EmptyUser,
}

impl ServeArgs {
    /// Parses the arguments after `serve`. Both `--opt value` and `--opt=value` work.
    pub fn parse(args: &[String]) -> Result<Self, ArgsError> {
        let mut listen = None;
        let mut hash = None;
        let mut user = None;
        let mut manage_system = false;
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name, Some(value.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = |flag: &'static str| {
                inline
                    .clone()
                    .or_else(|| iter.next().cloned())
                    .ok_or(ArgsError::MissingValue(flag))
            };
            match name {
                "--listen" => {
                    let text = value("--listen")?;
                    listen = Some(text.parse().map_err(|_| ArgsError::Listen(text))?);
                }
                "--access-token-sha256" => {
                    let text = value("--access-token-sha256")?;
                    let bytes = hex::decode(text.trim()).map_err(|_| ArgsError::TokenHash)?;
                    hash = Some(<[u8; 32]>::try_from(bytes).map_err(|_| ArgsError::TokenHash)?);
                }
                "--default-user" => {
                    let text = value("--default-user")?;
                    if text.is_empty() {
                        return Err(ArgsError::EmptyUser);
                    }
                    user = Some(text);
                }
                "--manage-system" if inline.is_none() => manage_system = true,
                _ => return Err(ArgsError::Unknown(arg.clone())),
            }
        }
        let listen = match listen {
            Some(addr) => addr,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|_| ArgsError::Listen(DEFAULT_LISTEN.into()))?,
        };
        Ok(Self {
            listen,
            access_token_sha256: hash,
            default_user: user,
            manage_system,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServeArgs, ArgsError> {
        ServeArgs::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_and_options() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.listen.port(), 49983);
        assert!(!args.manage_system);
        let hash = "ab".repeat(32);
        let args = parse(&[
            "--listen",
            "127.0.0.1:0",
            &format!("--access-token-sha256={hash}"),
            "--default-user",
            "user",
            "--manage-system",
        ])
        .unwrap();
        assert_eq!(args.listen.to_string(), "127.0.0.1:0");
        assert_eq!(args.access_token_sha256, Some([0xab; 32]));
        assert_eq!(args.default_user.as_deref(), Some("user"));
        assert!(args.manage_system);
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse(&["--listen"]),
            Err(ArgsError::MissingValue("--listen"))
        );
        assert!(matches!(
            parse(&["--listen", "nope"]),
            Err(ArgsError::Listen(_))
        ));
        assert_eq!(
            parse(&["--access-token-sha256", "abc"]),
            Err(ArgsError::TokenHash)
        );
        assert!(matches!(parse(&["--bogus"]), Err(ArgsError::Unknown(_))));
        assert_eq!(parse(&["--default-user="]), Err(ArgsError::EmptyUser));
    }
}
