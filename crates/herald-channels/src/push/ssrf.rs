//! The SSRF guard of Web Push. Endpoints come from browsers, that is from
//! anyone who can register a device, so Herald must not be talked into
//! posting to its own network: an endpoint must be `https`, and every
//! address its host resolves to must be public. The check runs inside the
//! HTTP client's resolver, and the client connects only to the addresses
//! that passed, so a DNS answer that changes between check and connect
//! (DNS rebinding) cannot get around it. Redirects are never followed.
//!
//! `allow_loopback` (tests only; refused in production by `herald-config`)
//! additionally allows `http://` and the loopback addresses, nothing else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// An endpoint or address the guard refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint refused: {reason}")]
pub struct Blocked {
    pub reason: String,
}

impl Blocked {
    fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }
}

/// What kind of non-public address `ip` is, if it is one. Loopback
/// addresses pass when `allow_loopback` is set.
#[must_use]
pub fn forbidden_kind(ip: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4, allow_loopback),
        IpAddr::V6(v6) => forbidden_v6(v6, allow_loopback),
    }
}

fn forbidden_v4(ip: Ipv4Addr, allow_loopback: bool) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        return (!allow_loopback).then_some("loopback");
    }
    Some(match (a, b, c) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared address space (100.64.0.0/10)",
        (169, 254, _) => "link-local (169.254.0.0/16)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation range",
        (192, 88, 99) => "6to4 relay anycast (192.88.99.0/24)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast (224.0.0.0/4)",
        (240..=255, _, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr, allow_loopback: bool) -> Option<&'static str> {
    if ip.is_loopback() {
        return (!allow_loopback).then_some("loopback (::1)");
    }
    if ip.is_unspecified() {
        return Some("unspecified (::)");
    }
    let seg = ip.segments();
    // Addresses that embed an IPv4 address are judged by it. Mapped
    // loopback stays refused even in tests: only 127.x and ::1 are allowed.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4, false).map(|_| "IPv4-mapped non-public address");
    }
    if seg[..6] == [0, 0, 0, 0, 0, 0] {
        return Some("IPv4-compatible address (::/96)");
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = Ipv4Addr::from((u32::from(seg[6]) << 16) | u32::from(seg[7]));
        return forbidden_v4(v4, false).map(|_| "NAT64 address of a non-public IPv4 address");
    }
    if seg[0] == 0x2002 {
        let v4 = Ipv4Addr::from((u32::from(seg[1]) << 16) | u32::from(seg[2]));
        return forbidden_v4(v4, false).map(|_| "6to4 address of a non-public IPv4 address");
    }
    Some(match seg[0] {
        0xfc00..=0xfdff => "unique local (fc00::/7)",
        0xfe80..=0xfebf => "link-local (fe80::/10)",
        0xfec0..=0xfeff => "site-local (fec0::/10)",
        0xff00..=0xffff => "multicast (ff00::/8)",
        0x2001 if seg[1] == 0x0db8 => "documentation (2001:db8::/32)",
        0x0100 if seg[1..4] == [0, 0, 0] => "discard-only (100::/64)",
        _ => return None,
    })
}

/// Checks what can be checked before any lookup: the scheme, and the host
/// when it is an IP address (the client connects to those without asking
/// the resolver).
pub fn check_endpoint(url: &reqwest::Url, allow_loopback: bool) -> Result<(), Blocked> {
    match url.scheme() {
        "https" => {}
        "http" if allow_loopback => {}
        other => return Err(Blocked::new(format!("the scheme must be https, not {other}"))),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Blocked::new("credentials in the URL"));
    }
    let ip = match url.host() {
        None => return Err(Blocked::new("no host")),
        Some(url::Host::Domain(_)) => return Ok(()),
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
    };
    match forbidden_kind(ip, allow_loopback) {
        Some(kind) => Err(Blocked::new(format!("{ip} is a {kind} address"))),
        None => Ok(()),
    }
}

/// A resolver that answers only with public addresses, and fails when a
/// host resolves to any address that is not.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_loopback: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_loopback = self.allow_loopback;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no addresses").into());
            }
            for addr in &addrs {
                if let Some(kind) = forbidden_kind(addr.ip(), allow_loopback) {
                    let blocked = Blocked::new(format!("{host} resolves to {}, a {kind} address", addr.ip()));
                    return Err(Box::new(blocked) as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The guard's refusal inside an HTTP client error, if that is what it is.
pub(crate) fn blocked_in(e: &reqwest::Error) -> Option<&Blocked> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<Blocked>() {
            return Some(b);
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str) -> bool {
        forbidden_kind(ip.parse().unwrap(), false).is_some()
    }

    fn refused_in_tests(ip: &str) -> bool {
        forbidden_kind(ip.parse().unwrap(), true).is_some()
    }

    #[test]
    fn private_ipv4_ranges_are_refused() {
        for ip in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.20.10.5",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.254",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
    }

    #[test]
    fn the_edges_of_172_16_slash_12_are_exact() {
        assert!(!refused("172.15.255.255"));
        assert!(!refused("172.32.0.1"));
    }

    #[test]
    fn loopback_link_local_cgnat_multicast_and_unspecified_ipv4_are_refused() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "0.0.0.0",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "192.0.0.8",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
        assert!(!refused("100.63.255.255"));
        assert!(!refused("100.128.0.1"));
    }

    #[test]
    fn ipv6_loopback_unique_local_link_local_and_multicast_are_refused() {
        for ip in [
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
    }

    #[test]
    fn ipv6_addresses_embedding_private_ipv4_are_refused() {
        for ip in [
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:192.168.1.1",
            "::ffff:169.254.169.254",
            "::10.0.0.1",
            "64:ff9b::10.0.0.1",
            "2002:0a00:0001::1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
        assert!(!refused("::ffff:8.8.8.8"));
        assert!(!refused("64:ff9b::8.8.8.8"));
    }

    #[test]
    fn public_addresses_are_allowed() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "142.250.185.74",
            "17.253.144.10",
            "2a00:1450:4001:80b::200a",
            "2606:4700:4700::1111",
        ] {
            assert!(!refused(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn the_test_switch_allows_loopback_and_nothing_else() {
        assert!(!refused_in_tests("127.0.0.1"));
        assert!(!refused_in_tests("::1"));
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "fc00::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(refused_in_tests(ip), "{ip} should still be refused");
        }
    }

    #[test]
    fn endpoints_must_be_https_unless_the_test_switch_is_on() {
        let http: reqwest::Url = "http://push.example.com/x".parse().unwrap();
        assert!(check_endpoint(&http, false).is_err());
        assert!(check_endpoint(&http, true).is_ok());
        let https: reqwest::Url = "https://push.example.com/x".parse().unwrap();
        assert!(check_endpoint(&https, false).is_ok());
        let ftp: reqwest::Url = "ftp://push.example.com/x".parse().unwrap();
        assert!(check_endpoint(&ftp, true).is_err());
    }

    #[test]
    fn literal_ip_endpoints_are_checked_without_a_lookup() {
        for url in [
            "https://10.0.0.1/push",
            "https://127.0.0.1:8443/push",
            "https://[::1]/push",
            "https://[fe80::1]/push",
            "https://[::ffff:10.0.0.1]/push",
            "https://0.0.0.0/push",
            "https://169.254.169.254/latest/meta-data",
        ] {
            let url: reqwest::Url = url.parse().unwrap();
            assert!(check_endpoint(&url, false).is_err(), "{url} should be refused");
        }
        let public: reqwest::Url = "https://8.8.8.8/push".parse().unwrap();
        assert!(check_endpoint(&public, false).is_ok());
    }

    #[test]
    fn credentials_in_an_endpoint_are_refused() {
        let url: reqwest::Url = "https://user:pw@push.example.com/x".parse().unwrap();
        assert!(check_endpoint(&url, false).is_err());
    }

    #[tokio::test]
    async fn the_resolver_refuses_a_name_that_resolves_to_loopback() {
        let resolver = GuardedResolver { allow_loopback: false };
        let err = match resolver.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(e) => e,
        };
        let blocked = err.downcast_ref::<Blocked>().expect("a Blocked error");
        assert!(blocked.reason.contains("loopback"), "{}", blocked.reason);
        let allowing = GuardedResolver { allow_loopback: true };
        let addrs: Vec<_> = allowing.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }
}
