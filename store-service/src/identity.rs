//! Callers known by their mesh identity instead of a token: the SANs of the client certificate
//! on a connection the store terminates itself (`tls.rs`), or the `x-forwarded-client-cert`
//! (XFCC) header its own sidecar sets — believed only from the proxy addresses it is told to
//! trust, so a client cannot name itself.
//!
//! An identity is a certificate's URI SAN (a SPIFFE id such as
//! `spiffe://cluster.local/ns/shop/sa/orders`) or DNS SAN; the credentials file maps identities
//! to roles and services (`auth.rs`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use thiserror::Error;
use x509_parser::extensions::GeneralName;

/// The header an Envoy in front of the store sets (`forward_client_cert_details`).
pub const XFCC: &str = "x-forwarded-client-cert";

/// The identities a request's caller proved, URI SANs first: a request extension.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity(pub Arc<[String]>);

/// The identities (URI SANs, then DNS SANs) of a DER certificate; empty when it has none or does
/// not parse.
pub fn certificate_identities(der: &[u8]) -> Vec<String> {
    let Ok((_, certificate)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = certificate.subject_alternative_name() else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut names = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(uri) => uris.push((*uri).to_owned()),
            GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
            _ => {}
        }
    }
    uris.extend(names);
    uris
}

/// The identities in an XFCC header value: the `URI` and `DNS` fields of its **last** element,
/// the one added by the proxy nearest the store (with `SANITIZE_SET` the only one; with
/// `APPEND_FORWARD` earlier elements come from the caller and are not believed). A value whose
/// quotes do not balance names nobody: an open quote sent by a caller would otherwise swallow the
/// `,` before the element its proxy appended and make the caller's own element the last.
pub fn xfcc_identities(value: &str) -> Vec<String> {
    let Some(element) = split_outside_quotes(value, ',').and_then(|mut elements| elements.pop()) else {
        return Vec::new();
    };
    let Some(pairs) = split_outside_quotes(&element, ';') else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut names = Vec::new();
    for pair in pairs {
        let Some((key, raw)) = pair.split_once('=') else {
            continue;
        };
        let value = unquote(raw.trim());
        if value.is_empty() {
            continue;
        }
        match key.trim().to_ascii_lowercase().as_str() {
            "uri" => uris.push(value),
            "dns" => names.push(value),
            _ => {}
        }
    }
    uris.extend(names);
    uris
}

/// Split on `separator` where it is not inside double quotes (`\"` escapes a quote); `None` when
/// a quote is left open or an escape unfinished.
fn split_outside_quotes(text: &str, separator: char) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let (mut quoted, mut escaped) = (false, false);
    for c in text.chars() {
        match c {
            _ if escaped => {
                current.push(c);
                escaped = false;
                continue;
            }
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if quoted || escaped {
        return None;
    }
    if !current.trim().is_empty() {
        parts.push(current);
    }
    Some(parts)
}

fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\""),
        None => value.to_owned(),
    }
}

/// Why `--trusted-proxies` was refused.
#[derive(Debug, Error)]
#[error("--trusted-proxies: {0:?} {1}")]
pub struct BadProxy(String, &'static str);

/// The peer addresses whose XFCC header is believed (`--trusted-proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parse addresses and CIDR blocks.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, BadProxy> {
        entries
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                let net = entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        BadProxy(
                            entry.to_owned(),
                            "is not an address or CIDR block (e.g. 127.0.0.6/32)",
                        )
                    })?;
                if net.prefix_len() == 0 {
                    return Err(BadProxy(
                        entry.to_owned(),
                        "trusts every address: any client could name itself in x-forwarded-client-cert",
                    ));
                }
                if matches!(net, IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some()) {
                    return Err(BadProxy(
                        entry.to_owned(),
                        "is IPv4-mapped: give the IPv4 address (peers are compared as IPv4)",
                    ));
                }
                Ok(net)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    /// True when `peer` is one of them.
    pub fn trusts(&self, peer: &SocketAddr) -> bool {
        let ip = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// True when none is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_xfcc_element_names_the_caller() {
        let header = concat!(
            r#"By=spiffe://cluster.local/ns/idempotency/sa/store;Hash=abc;Subject="CN=forged, O=\"x;y\"";URI=spiffe://cluster.local/ns/shop/sa/forged,"#,
            r#"By=spiffe://cluster.local/ns/idempotency/sa/store;Hash=def;Subject="";URI=spiffe://cluster.local/ns/shop/sa/orders;DNS=orders.shop;DNS=orders"#
        );
        assert_eq!(
            xfcc_identities(header),
            [
                "spiffe://cluster.local/ns/shop/sa/orders",
                "orders.shop",
                "orders"
            ]
        );
        assert!(xfcc_identities("Hash=abc;Subject=\"CN=x\"").is_empty());
        assert!(xfcc_identities("").is_empty());
    }

    #[test]
    fn an_open_quote_cannot_make_the_callers_element_the_last() {
        // APPEND_FORWARD: the caller's `x="` would swallow the `,` before its proxy's element.
        let header = concat!(
            r#"URI=spiffe://cluster.local/ns/pay/sa/payments;x=","#,
            r#"By=spiffe://cluster.local/ns/idempotency/sa/store;Hash=def;Subject="";URI=spiffe://cluster.local/ns/shop/sa/orders"#
        );
        assert!(
            xfcc_identities(header).is_empty(),
            "{:?}",
            xfcc_identities(header)
        );
        assert!(
            xfcc_identities(r#"URI=spiffe://x;Subject="CN=a"#).is_empty(),
            "unfinished escape"
        );
    }

    #[test]
    fn trusted_proxies_are_addresses_or_blocks() {
        let trusted =
            TrustedProxies::parse(&["127.0.0.6/32".into(), "10.1.0.0/16".into(), "::1".into()]).unwrap();
        assert!(trusted.trusts(&"127.0.0.6:40000".parse().unwrap()));
        assert!(trusted.trusts(&"10.1.2.3:1".parse().unwrap()));
        assert!(trusted.trusts(&"[::1]:1".parse().unwrap()));
        assert!(
            trusted.trusts(&"[::ffff:127.0.0.6]:1".parse().unwrap()),
            "v4-mapped"
        );
        assert!(!trusted.trusts(&"127.0.0.1:40000".parse().unwrap()));
        let error = TrustedProxies::parse(&["sidecar".into()])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--trusted-proxies") && error.contains("sidecar"),
            "{error}"
        );
    }
}
