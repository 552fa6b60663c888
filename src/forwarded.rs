//! Who the client is and what the upstream is told about it: `X-Forwarded-For`, `-Proto`,
//! `-Host`. Incoming forwarding headers are believed only from `server.trusted_proxies`.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::Errors;

/// `server.trusted_proxies`, compiled: peers whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Compiles the list of IPs and CIDR ranges (at YAML path `at`).
    pub fn compile(raw: &[String], at: &str, errors: &mut Errors) -> Self {
        let mut nets = Vec::new();
        for (i, text) in raw.iter().enumerate() {
            let net = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
            match net {
                Ok(net) => nets.push(net),
                Err(_) => errors.push(
                    format!("{at}[{i}]"),
                    format!("`{text}` is not an IP address or CIDR range"),
                ),
            }
        }
        Self(nets)
    }

    /// Whether a peer at `ip` may tell us who the client is. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`) matches as the IPv4 address it is and as itself, so an entry in
    /// either spelling covers an IPv4 peer of a dual-stack listener.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        let mapped = match ip {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        };
        self.0
            .iter()
            .any(|net| net.contains(&canonical) || net.contains(&mapped))
    }
}

/// The client as the proxy understands it, and the forwarding headers to send upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The original client: the peer, or, behind trusted proxies, the nearest untrusted hop.
    pub client_ip: IpAddr,
    /// `X-Forwarded-For` for the upstream: the trusted chain plus the peer.
    pub for_chain: String,
    /// `X-Forwarded-Proto` for the upstream.
    pub proto: String,
    /// `X-Forwarded-Host` for the upstream, if the request named a host.
    pub host: Option<String>,
}

/// What the request said, as far as forwarding is concerned.
pub struct Incoming<'a> {
    /// The TCP peer.
    pub peer: IpAddr,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// `Host` (or `:authority`).
    pub host: Option<&'a str>,
    /// Incoming `X-Forwarded-For`, all values joined by commas.
    pub xff: Option<&'a str>,
    /// Incoming `X-Forwarded-Proto`.
    pub proto: Option<&'a str>,
    /// Incoming `X-Forwarded-Host`.
    pub forwarded_host: Option<&'a str>,
}

/// Decides the client address and forwarding headers. Addresses are canonical: an IPv4
/// client of a dual-stack (`[::]`) listener, `::ffff:a.b.c.d`, is `a.b.c.d`, for the
/// trusted proxies, the rate-limit keys and the upstream alike.
pub fn resolve(req: &Incoming<'_>, trusted: &TrustedProxies) -> Forwarded {
    let own_proto = if req.tls { "https" } else { "http" };
    let peer = req.peer.to_canonical();
    if !trusted.contains(peer) {
        return Forwarded {
            client_ip: peer,
            for_chain: peer.to_string(),
            proto: own_proto.to_string(),
            host: req.host.map(str::to_string),
        };
    }
    // Walk the chain from the nearest hop; the first address we do not trust is the client.
    let hops: Vec<&str> = req
        .xff
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let parsed: Option<Vec<IpAddr>> = hops
        .iter()
        .map(|h| h.parse().ok().map(|ip: IpAddr| ip.to_canonical()))
        .collect();
    let client_ip = match parsed {
        Some(ips) => ips
            .iter()
            .rev()
            .find(|ip| !trusted.contains(**ip))
            .or(ips.first())
            .copied()
            .unwrap_or(peer),
        // A garbled chain from a trusted proxy: do not guess, use the peer.
        None => peer,
    };
    let mut for_chain = hops.join(", ");
    if !for_chain.is_empty() {
        for_chain.push_str(", ");
    }
    for_chain.push_str(&peer.to_string());
    Forwarded {
        client_ip,
        for_chain,
        proto: match req.proto {
            Some(p @ ("http" | "https")) => p.to_string(),
            _ => own_proto.to_string(),
        },
        host: req.forwarded_host.or(req.host).map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> TrustedProxies {
        let mut errors = Errors::default();
        let trusted = TrustedProxies::compile(&["10.0.0.0/8".into()], "t", &mut errors);
        assert!(errors.is_empty());
        trusted
    }

    fn incoming<'a>(peer: &str, xff: Option<&'a str>) -> Incoming<'a> {
        Incoming {
            peer: peer.parse().unwrap(),
            tls: false,
            host: Some("edge.example"),
            xff,
            proto: Some("https"),
            forwarded_host: Some("public.example"),
        }
    }

    #[test]
    fn untrusted_peer_cannot_spoof() {
        let f = resolve(&incoming("203.0.113.9", Some("1.2.3.4")), &server());
        assert_eq!(f.client_ip.to_string(), "203.0.113.9");
        assert_eq!(f.for_chain, "203.0.113.9");
        assert_eq!(f.proto, "http");
        assert_eq!(f.host.as_deref(), Some("edge.example"));
    }

    #[test]
    fn trusted_peer_extends_the_chain() {
        let f = resolve(
            &incoming("10.0.0.2", Some("198.51.100.7, 10.0.0.1")),
            &server(),
        );
        assert_eq!(f.client_ip.to_string(), "198.51.100.7");
        assert_eq!(f.for_chain, "198.51.100.7, 10.0.0.1, 10.0.0.2");
        assert_eq!(f.proto, "https");
        assert_eq!(f.host.as_deref(), Some("public.example"));
    }

    #[test]
    fn trusted_peer_without_or_with_garbled_chain() {
        let f = resolve(&incoming("10.0.0.2", None), &server());
        assert_eq!(f.client_ip.to_string(), "10.0.0.2");
        assert_eq!(f.for_chain, "10.0.0.2");
        let f = resolve(&incoming("10.0.0.2", Some("not-an-ip")), &server());
        assert_eq!(f.client_ip.to_string(), "10.0.0.2");
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_are_ipv4() {
        // A `[::]` listener sees IPv4 peers as `::ffff:a.b.c.d`.
        let f = resolve(&incoming("::ffff:203.0.113.9", None), &server());
        assert_eq!(f.client_ip.to_string(), "203.0.113.9");
        assert_eq!(f.for_chain, "203.0.113.9");
        // The IPv4 trusted proxy is trusted, and a mapped hop in its chain is IPv4 too.
        let f = resolve(
            &incoming("::ffff:10.0.0.2", Some("::ffff:198.51.100.7")),
            &server(),
        );
        assert_eq!(f.client_ip.to_string(), "198.51.100.7");
        assert_eq!(f.for_chain, "::ffff:198.51.100.7, 10.0.0.2");
        // An entry written in the mapped spelling covers the IPv4 peer too.
        let mut errors = Errors::default();
        let mapped = TrustedProxies::compile(&["::ffff:10.0.0.0/104".into()], "t", &mut errors);
        assert!(errors.is_empty());
        assert!(mapped.contains("10.0.0.2".parse().unwrap()));
        assert!(mapped.contains("::ffff:10.0.0.2".parse().unwrap()));
        assert!(!mapped.contains("11.0.0.2".parse().unwrap()));
    }
}
