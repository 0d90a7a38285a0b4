//! A sandbox's egress rules: what a tenant may allow and deny on top of the host's own
//! rules, which no tenant can loosen.
//!
//! The wire form ([`EgressRules`]) is two lists of strings, as E2B's API has them:
//! `allow_out` holds IPv4 addresses, CIDR blocks and domain names (`example.com` matches
//! that name only, `*.example.com` every name below it but not itself), `deny_out` holds
//! addresses and CIDR blocks. An allowed destination is reachable even when a deny rule
//! covers it; anything neither allowed nor denied is reachable. `0.0.0.0/0` in `deny_out`
//! denies everything not allowed ([`ALL_TRAFFIC`]).
//!
//! [`EgressRules::parse`] is the one validation both the control plane (at the edge) and
//! the host agent (before it touches nftables) run; its result, [`Egress`], is normalised:
//! CIDR blocks are truncated to their network, names lowercased without a trailing dot,
//! duplicates removed, order kept.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The CIDR block that stands for every destination.
pub const ALL_TRAFFIC: &str = "0.0.0.0/0";
/// Most entries in each list.
pub const MAX_RULES: usize = 256;

/// Egress rules as clients send and read them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EgressRules {
    /// Destinations allowed even when a deny rule covers them: IPv4 addresses, CIDR blocks
    /// (`198.51.100.0/24`) or domain names (`example.com`, `*.example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// Destinations denied unless allowed: IPv4 addresses or CIDR blocks; `0.0.0.0/0`
    /// denies everything not allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
}

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// A list is too long.
    #[error("{list}: at most {MAX_RULES} entries")]
    TooMany {
        /// `allow_out` or `deny_out`.
        list: &'static str,
    },
    /// An entry is neither an address, a block nor (where allowed) a name.
    #[error("{list}: `{entry}` is {reason}")]
    Invalid {
        /// `allow_out` or `deny_out`.
        list: &'static str,
        /// The entry, cut to 100 characters.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A domain rule: one name, or every name below a suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    /// This name only (lowercase, no trailing dot).
    Exact(String),
    /// Every name ending in `.<suffix>`, at any depth, but not the suffix itself.
    Below(String),
}

impl DomainPattern {
    /// Whether `name` (any case, with or without a trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        match self {
            DomainPattern::Exact(d) => name.eq_ignore_ascii_case(d),
            DomainPattern::Below(suffix) => {
                name.len() > suffix.len() + 1
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                    && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Below(d) => write!(f, "*.{d}"),
        }
    }
}

/// Validated, normalised egress rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    /// Blocks allowed.
    pub allow_nets: Vec<Ipv4Net>,
    /// Names allowed: their addresses, as the host's resolver answers them.
    pub allow_domains: Vec<DomainPattern>,
    /// Blocks denied.
    pub deny_nets: Vec<Ipv4Net>,
}

impl Egress {
    /// No rule at all: the sandbox reaches whatever the host allows.
    pub fn is_open(&self) -> bool {
        self.allow_nets.is_empty() && self.allow_domains.is_empty() && self.deny_nets.is_empty()
    }

    /// Everything not allowed is denied: the deny rules together cover every address
    /// (`0.0.0.0/0`, or e.g. `0.0.0.0/1` with `128.0.0.0/1`).
    pub fn denies_all(&self) -> bool {
        let mut ranges: Vec<(u64, u64)> = self
            .deny_nets
            .iter()
            .map(|n| {
                (
                    u64::from(u32::from(n.network())),
                    u64::from(u32::from(n.broadcast())),
                )
            })
            .collect();
        ranges.sort_unstable();
        let mut next = 0u64;
        for (start, end) in ranges {
            if start > next {
                return false;
            }
            next = next.max(end + 1);
        }
        next > u64::from(u32::MAX)
    }

    /// Whether a name may be resolved for the sandbox: always, unless everything not
    /// allowed is denied, in which case only allowed names are.
    pub fn may_resolve(&self, name: &str) -> bool {
        !self.denies_all() || self.domain_allowed(name)
    }

    /// Whether `name` matches an allowed domain rule.
    pub fn domain_allowed(&self, name: &str) -> bool {
        self.allow_domains.iter().any(|d| d.matches(name))
    }

    /// Back to the wire form.
    pub fn rules(&self) -> EgressRules {
        EgressRules {
            allow_out: self
                .allow_nets
                .iter()
                .map(net_string)
                .chain(self.allow_domains.iter().map(ToString::to_string))
                .collect(),
            deny_out: self.deny_nets.iter().map(net_string).collect(),
        }
    }
}

/// `a.b.c.d` for a single address, `a.b.c.d/n` otherwise.
fn net_string(n: &Ipv4Net) -> String {
    if n.prefix_len() == 32 {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

impl EgressRules {
    /// Rules denying everything (`allow_internet_access: false`).
    pub fn deny_all() -> Self {
        EgressRules {
            allow_out: Vec::new(),
            deny_out: vec![ALL_TRAFFIC.to_string()],
        }
    }

    /// No rule in either list.
    pub fn is_empty(&self) -> bool {
        self.allow_out.is_empty() && self.deny_out.is_empty()
    }

    /// Validates and normalises the rules.
    pub fn parse(&self) -> Result<Egress, EgressError> {
        for (list, entries) in [("allow_out", &self.allow_out), ("deny_out", &self.deny_out)] {
            if entries.len() > MAX_RULES {
                return Err(EgressError::TooMany { list });
            }
        }
        let mut out = Egress::default();
        for entry in &self.allow_out {
            match parse_target("allow_out", entry, true)? {
                Target::Net(n) => push_unique(&mut out.allow_nets, n),
                Target::Domain(d) => push_unique(&mut out.allow_domains, d),
            }
        }
        for entry in &self.deny_out {
            // Names are refused in deny rules, so only blocks come back.
            if let Target::Net(n) = parse_target("deny_out", entry, false)? {
                push_unique(&mut out.deny_nets, n);
            }
        }
        Ok(out)
    }

    /// The normalised form of these rules (see [`EgressRules::parse`]).
    pub fn normalized(&self) -> Result<EgressRules, EgressError> {
        self.parse().map(|e| e.rules())
    }
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

enum Target {
    Net(Ipv4Net),
    Domain(DomainPattern),
}

fn parse_target(list: &'static str, entry: &str, names: bool) -> Result<Target, EgressError> {
    let invalid = |reason| EgressError::Invalid {
        list,
        entry: entry.chars().take(100).collect(),
        reason,
    };
    let s = entry.trim();
    if s.is_empty() {
        return Err(invalid("empty"));
    }
    if s.contains(':') {
        return Err(invalid(
            "an IPv6 destination: sandboxes have IPv4 networking only",
        ));
    }
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(Target::Net(Ipv4Net::from(ip)));
    }
    if let Some((addr, len)) = s.split_once('/') {
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| invalid("not an IPv4 CIDR block"))?;
        let len: u8 = len.parse().map_err(|_| invalid("not an IPv4 CIDR block"))?;
        let net = Ipv4Net::new(addr, len).map_err(|_| invalid("not an IPv4 CIDR block"))?;
        return Ok(Target::Net(net.trunc()));
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(invalid("not an IPv4 address"));
    }
    if !names {
        return Err(invalid(
            "a domain name: deny rules take addresses and CIDR blocks only",
        ));
    }
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let (below, name) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest.to_string()),
        None => (false, name),
    };
    if name.len() > 253 {
        return Err(invalid("longer than 253 characters"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name.split('.').all(label_ok) {
        return Err(invalid(
            "neither an IPv4 address, a CIDR block nor a domain name (`example.com`, `*.example.com`)",
        ));
    }
    Ok(Target::Domain(if below {
        DomainPattern::Below(name)
    } else {
        DomainPattern::Exact(name)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> EgressRules {
        EgressRules {
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn parses_and_normalises() {
        let e = rules(
            &[
                "8.8.8.8",
                "10.1.2.3/8",
                "Example.COM.",
                "*.github.com",
                "8.8.8.8/32",
            ],
            &["0.0.0.0/0"],
        )
        .parse()
        .unwrap();
        assert_eq!(e.allow_nets.len(), 2, "duplicates removed: {e:?}");
        assert_eq!(e.allow_nets[1].to_string(), "10.0.0.0/8");
        assert!(e.denies_all());
        assert_eq!(
            e.rules(),
            rules(
                &["8.8.8.8", "10.0.0.0/8", "example.com", "*.github.com"],
                &["0.0.0.0/0"]
            )
        );
        assert!(rules(&[], &[]).parse().unwrap().is_open());
    }

    #[test]
    fn refuses_bad_entries_with_a_reason() {
        for (allow, deny, needle) in [
            (vec![""], vec![], "empty"),
            (vec!["::1"], vec![], "IPv6"),
            (vec!["1.2.3.4/33"], vec![], "CIDR"),
            (vec!["1.2.3"], vec![], "IPv4 address"),
            (vec!["exa mple.com"], vec![], "domain name"),
            (vec!["*"], vec![], "domain name"),
            (vec!["-a.com"], vec![], "domain name"),
            (vec![], vec!["example.com"], "deny rules"),
        ] {
            let err = rules(&allow, &deny).parse().unwrap_err().to_string();
            assert!(err.contains(needle), "{allow:?} {deny:?}: {err}");
        }
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let err = EgressRules {
            allow_out: many,
            deny_out: vec![],
        }
        .parse()
        .unwrap_err();
        assert!(matches!(err, EgressError::TooMany { list: "allow_out" }));
    }

    #[test]
    fn domain_patterns_match_as_documented() {
        let exact = DomainPattern::Exact("example.com".into());
        assert!(exact.matches("example.com"));
        assert!(exact.matches("EXAMPLE.com."));
        assert!(!exact.matches("www.example.com"));
        assert!(!exact.matches("badexample.com"));
        let below = DomainPattern::Below("example.com".into());
        assert!(below.matches("www.example.com"));
        assert!(below.matches("a.b.Example.com."));
        assert!(!below.matches("example.com"), "not the apex");
        assert!(!below.matches("badexample.com"));
        assert!(!below.matches(".example.com"));
    }

    #[test]
    fn resolution_follows_the_default() {
        let open = rules(&["example.com"], &["198.51.100.0/24"])
            .parse()
            .unwrap();
        assert!(open.may_resolve("anything.org"), "not everything is denied");
        let halves = rules(&[], &["128.0.0.0/1", "0.0.0.0/1"]).parse().unwrap();
        assert!(halves.denies_all(), "two halves deny everything");
        let gap = rules(&[], &["0.0.0.0/1", "128.0.0.0/2", "224.0.0.0/3"])
            .parse()
            .unwrap();
        assert!(!gap.denies_all(), "192.0.0.0/3 is left");
        let closed = rules(&["example.com"], &[ALL_TRAFFIC]).parse().unwrap();
        assert!(closed.may_resolve("example.com"));
        assert!(!closed.may_resolve("other.com"));
        assert_eq!(EgressRules::deny_all().parse().unwrap().deny_nets.len(), 1);
    }
}
