//! How a request names the user it acts as.
//!
//! E2B's SDKs select the user of a Connect call with `Authorization: Basic base64("<user>:")`
//! (the password is empty and ignored), and of a `/files` call with the `username` query
//! parameter. The access token is a separate header ([`crate::headers::ACCESS_TOKEN`]).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// The `Authorization` header value that selects `user`.
pub fn basic_user_header(user: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:")))
}

/// Why an `Authorization` header does not name a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BasicAuthError {
    /// The scheme is not `Basic`.
    #[error("authorization scheme is not basic")]
    NotBasic,
    /// The credentials are not base64 of UTF-8 text.
    #[error("authorization credentials are not base64 text")]
    Malformed,
    /// The user name is empty.
    #[error("authorization names no user")]
    EmptyUser,
}

/// Parses the user out of an `Authorization: Basic …` header value.
pub fn parse_basic_user(value: &str) -> Result<String, BasicAuthError> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').ok_or(BasicAuthError::NotBasic)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(BasicAuthError::NotBasic);
    }
    let decoded = STANDARD
        .decode(rest.trim())
        .map_err(|_| BasicAuthError::Malformed)?;
    let text = String::from_utf8(decoded).map_err(|_| BasicAuthError::Malformed)?;
    let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
    if user.is_empty() {
        return Err(BasicAuthError::EmptyUser);
    }
    Ok(user.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let header = basic_user_header("user");
        assert_eq!(header, "Basic dXNlcjo=");
        assert_eq!(parse_basic_user(&header).unwrap(), "user");
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(parse_basic_user("Bearer x"), Err(BasicAuthError::NotBasic));
        assert_eq!(
            parse_basic_user("Basic !!!"),
            Err(BasicAuthError::Malformed)
        );
        assert_eq!(
            parse_basic_user(&format!("Basic {}", STANDARD.encode(":"))),
            Err(BasicAuthError::EmptyUser)
        );
        // Without a colon the whole text is the user.
        assert_eq!(
            parse_basic_user(&format!("basic {}", STANDARD.encode("root"))).unwrap(),
            "root"
        );
    }
}
