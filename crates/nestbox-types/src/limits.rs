//! Defaults shared by the control plane, the host agent and the clients.

/// Default vCPUs of a sandbox.
pub const DEFAULT_VCPUS: u32 = 1;
/// Default memory of a sandbox, MiB.
pub const DEFAULT_MEMORY_MB: u32 = 512;
/// Default root disk of a sandbox, MiB (the seed's 5 GB default).
pub const DEFAULT_DISK_SIZE_MB: u32 = 5120;
/// Default inactivity timeout of a sandbox, seconds.
pub const DEFAULT_TIMEOUT_SEC: u32 = 300;
/// The TCP port the guest agent listens on inside every sandbox (E2B's envd port).
pub const GUEST_AGENT_PORT: u16 = 49983;
/// The version of E2B's in-VM protocol (envd) the guest agent speaks, as E2B's SDKs read
/// it from the REST API's `envdVersion`: they enable features by comparing it, so it names
/// the newest envd whose client-visible features the guest implements, and no newer one:
/// octet-stream and gzip uploads (0.5.7), file metadata (0.6.2), entries in watch events
/// (0.6.3), watching network mounts on request (0.6.4).
pub const ENVD_VERSION: &str = "0.6.4";
/// Name of the template every installation ships.
pub const DEFAULT_TEMPLATE: &str = "minimal";

/// Whether `name` is an acceptable template or snapshot name: 1–64 characters, starting
/// with a letter or digit, then letters, digits, `.`, `_` or `-`.
pub fn is_valid_template_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The tag a template name alone means (`name` is `name:default`).
pub const DEFAULT_TAG: &str = "default";

/// Whether `tag` can tag a template: the same rule as names ([`is_valid_template_name`]).
pub fn is_valid_template_tag(tag: &str) -> bool {
    is_valid_template_name(tag)
}

/// The name and tag of a template reference, `name` or `name:tag` (a name alone is its
/// [`DEFAULT_TAG`]); `None` if either part is not valid.
pub fn split_template_ref(reference: &str) -> Option<(&str, &str)> {
    let (name, tag) = reference
        .split_once(':')
        .unwrap_or((reference, DEFAULT_TAG));
    (is_valid_template_name(name) && is_valid_template_tag(tag)).then_some((name, tag))
}

/// Most log entries one request returns (E2B's logs endpoints default to this too).
pub const MAX_LOG_PAGE: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_references_are_a_name_and_a_tag() {
        assert_eq!(split_template_ref("py"), Some(("py", "default")));
        assert_eq!(split_template_ref("py:v1.2"), Some(("py", "v1.2")));
        assert_eq!(split_template_ref("py:"), None);
        assert_eq!(split_template_ref(":v1"), None);
        assert_eq!(split_template_ref("py:v1:v2"), None);
        assert_eq!(split_template_ref("py:a/b"), None);
    }

    #[test]
    fn template_names() {
        assert!(is_valid_template_name("minimal"));
        assert!(is_valid_template_name("py-3.11_data"));
        assert!(!is_valid_template_name(""));
        assert!(!is_valid_template_name("-x"));
        assert!(!is_valid_template_name("../etc"));
        assert!(!is_valid_template_name("a b"));
        assert!(!is_valid_template_name(&"a".repeat(65)));
    }
}
