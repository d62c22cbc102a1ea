//! The pairing ticket: what the desktop's QR code carries to the phone (DESIGN.md §7).
//!
//! - The desktop makes a [`Ticket`] with [`Ticket::new`]: its own PeerId, a few dialable
//!   addresses (routable ones first), a fresh random [`TicketId`] and [`TicketSecret`], and an
//!   expiry. It keeps the id, secret and expiry in its store and shows [`Ticket`]'s text form as
//!   a QR code and as plain text.
//! - The phone parses the text (QR scan, `errand:` deep link or paste) with [`str::parse`] /
//!   [`TryFrom<&str>`]. Every malformed input becomes a specific [`TicketError`]; nothing panics.
//! - The phone dials one of the addresses, sends the [`TicketId`] in the clear, and runs the
//!   pairing handshake with the [`TicketSecret`] as its pre-shared key.
//!
//! # Text form
//!
//! `errand:` followed by RFC 4648 base32 (upper case, no padding) of this binary layout, all
//! integers big-endian:
//!
//! | field       | size              | notes                                              |
//! |-------------|-------------------|----------------------------------------------------|
//! | version     | 1                 | [`TICKET_VERSION`]                                 |
//! | ticket id   | 8                 | random, sent in the clear during pairing           |
//! | expires     | 8                 | Unix seconds (u64); the expiry is rounded up to a whole second |
//! | secret      | 32                | random, the pairing PSK                            |
//! | peer id     | 1 + n             | length, then the binary multihash PeerId           |
//! | addr count  | 1                 | at most [`MAX_TICKET_ADDRS`]                       |
//! | each addr   | 1 + n             | length, then the multiaddr text                    |
//!
//! The text holds the one-time secret: show it to the user, never log it.

use std::{fmt, str::FromStr};

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};

use crate::{DeviceId, IdError, time::Millis};

/// The only ticket format this build reads and writes. Bump it when the binary layout changes;
/// the version byte comes first so that an old build can say "update Errand" instead of
/// misreading a newer layout.
pub const TICKET_VERSION: u8 = 1;

/// What every ticket text starts with. The phone registers `errand:` as a deep link scheme.
pub const TICKET_PREFIX: &str = "errand:";

/// Most addresses in one ticket. Each address grows the QR code; the phone learns further
/// addresses through mDNS, rendezvous and identify once it reaches any one of these.
pub const MAX_TICKET_ADDRS: usize = 4;

/// Longest address text, in bytes. A relay circuit address with an IPv6 relay and two Ed25519
/// PeerIds is about 180 bytes; anything longer is not a real dialable address.
pub const MAX_TICKET_ADDR_LEN: usize = 200;

/// Longest ticket text we try to decode, in bytes (after trimming surrounding whitespace).
/// A ticket with an Ed25519 PeerId and two addresses is 230–350 characters; 1024 leaves room for
/// four typical addresses while refusing junk before any decoding. [`Ticket::new`] never makes a
/// ticket whose text is longer.
pub const MAX_TICKET_TEXT_LEN: usize = 1024;

/// Size of the fixed part of the binary form: version, id, expiry, secret.
const FIXED_LEN: usize = 1 + TICKET_ID_LEN + 8 + TICKET_SECRET_LEN;

/// Length of a [`TicketId`] in bytes. 64 random bits: ids only need to be unique among the few
/// tickets one desktop has open at a time, and the id is public.
const TICKET_ID_LEN: usize = 8;

/// Length of a [`TicketSecret`] in bytes: 256 bits, the PSK size of the Noise handshake.
const TICKET_SECRET_LEN: usize = 32;

/// Why a ticket text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// The text does not start with `errand:`.
    #[error("not an Errand pairing ticket: it should start with \"errand:\"")]
    MissingPrefix,
    /// The text is longer than [`MAX_TICKET_TEXT_LEN`].
    #[error(
        "pairing ticket is too long ({len} bytes, at most {MAX_TICKET_TEXT_LEN}); \
         copy it again or scan the QR code"
    )]
    TooLong {
        /// Length of the (trimmed) input in bytes.
        len: usize,
    },
    /// The part after `errand:` is not base32.
    #[error("pairing ticket is damaged: the text after \"errand:\" is not valid base32")]
    Base32(#[source] data_encoding::DecodeError),
    /// The ticket ends before the named field is complete: usually a partial copy or scan.
    #[error("pairing ticket is incomplete: it ends in the middle of the {field}")]
    Truncated {
        /// The field that was cut off.
        field: &'static str,
    },
    /// The ticket has bytes after its last address.
    #[error("pairing ticket is damaged: {count} unexpected bytes after the end")]
    TrailingBytes {
        /// How many bytes were left over.
        count: usize,
    },
    /// The ticket was made by a newer (or unknown) version of Errand.
    #[error(
        "pairing ticket has format version {0}, but this Errand only reads version \
         {TICKET_VERSION}; update Errand on both devices"
    )]
    UnsupportedVersion(u8),
    /// The expiry is beyond what a millisecond timestamp can hold.
    #[error("pairing ticket is damaged: its expiry ({0} s after 1970) is out of range")]
    BadExpiry(u64),
    /// The desktop's PeerId is malformed.
    #[error("pairing ticket is damaged: the desktop id is not a valid PeerId")]
    BadPeerId(#[source] IdError),
    /// The ticket lists more than [`MAX_TICKET_ADDRS`] addresses.
    #[error("pairing ticket lists {count} addresses, at most {MAX_TICKET_ADDRS} are allowed")]
    TooManyAddresses {
        /// How many addresses the ticket claims.
        count: usize,
    },
    /// One address is malformed or repeats an earlier one.
    #[error("pairing ticket is damaged: address {index} {problem}")]
    BadAddress {
        /// Zero-based position of the address in the ticket.
        index: usize,
        /// What is wrong with it.
        problem: AddrProblem,
    },
}

/// What is wrong with one address of a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddrProblem {
    /// Zero bytes long.
    #[error("is empty")]
    Empty,
    /// Longer than [`MAX_TICKET_ADDR_LEN`].
    #[error("is longer than {MAX_TICKET_ADDR_LEN} bytes")]
    TooLong,
    /// Does not start with `/` as every multiaddr does.
    #[error("does not start with '/'")]
    NotMultiaddr,
    /// Contains a byte that is not printable ASCII (whitespace, control or non-ASCII).
    #[error("contains whitespace or characters that are not printable ASCII")]
    BadCharacter,
    /// Is the same as an earlier address.
    #[error("repeats an earlier address")]
    Duplicate,
}

/// Identifies a ticket: 8 random bytes, sent in the clear during pairing so that the desktop
/// knows which secret to use and whose wrong tries to count. Displayed as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TicketId([u8; TICKET_ID_LEN]);

impl TicketId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The id as received on the wire or kept in a store.
    pub fn from_bytes(bytes: [u8; TICKET_ID_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes, as sent on the wire.
    pub fn as_bytes(&self) -> &[u8; TICKET_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TicketId({self})")
    }
}

/// The one-time pairing secret: 32 random bytes, used as the handshake's pre-shared key.
///
/// `Debug` prints `TicketSecret(<redacted>)`. Equality is not constant-time: pairing checks
/// the secret through the handshake, never by comparing it.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketSecret([u8; TICKET_SECRET_LEN]);

impl TicketSecret {
    /// A fresh secret from the thread-local CSPRNG.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// A secret loaded back from the desktop's store.
    pub fn from_bytes(bytes: [u8; TICKET_SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw secret, to feed the handshake or the store.
    pub fn as_bytes(&self) -> &[u8; TICKET_SECRET_LEN] {
        &self.0
    }
}

impl fmt::Debug for TicketSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketSecret(<redacted>)")
    }
}

/// A pairing ticket: everything the phone needs to reach the desktop and prove it scanned the
/// QR code. See the [module docs](self) for the text form.
///
/// Always well formed: built by [`Ticket::new`] or parsed from text. Serializes as its text
/// form, which contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ticket {
    version: u8,
    id: TicketId,
    desktop: DeviceId,
    addrs: Vec<String>,
    secret: TicketSecret,
    expires_at: Millis,
}

impl Ticket {
    /// A new ticket for `desktop` with a random id and secret, valid for `ttl_ms` from `now_ms`.
    ///
    /// Keeps the first [`MAX_TICKET_ADDRS`] distinct, well-formed addresses in the order given
    /// (so pass routable ones first), and skips the rest: ill-formed ones, repeats, and any that
    /// would make the text longer than [`MAX_TICKET_TEXT_LEN`]. The expiry is rounded up to a
    /// whole second (the text form stores seconds) and is never before the Unix epoch.
    pub fn new<I>(desktop: DeviceId, addrs: I, ttl_ms: Millis, now_ms: Millis) -> Ticket
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut budget = max_binary_len().saturating_sub(FIXED_LEN + 2 + desktop.to_bytes().len());
        let mut kept: Vec<String> = Vec::new();
        for addr in addrs {
            if kept.len() == MAX_TICKET_ADDRS {
                break;
            }
            let addr = addr.as_ref();
            let cost = 1 + addr.len();
            if check_addr(addr.as_bytes(), &kept).is_ok() && cost <= budget {
                budget -= cost;
                kept.push(addr.to_owned());
            }
        }
        Ticket {
            version: TICKET_VERSION,
            id: TicketId::random(),
            desktop,
            addrs: kept,
            secret: TicketSecret::random(),
            expires_at: round_up_to_second(now_ms.saturating_add(ttl_ms).max(0)),
        }
    }

    /// The format version; always [`TICKET_VERSION`] for a ticket this build holds.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// The ticket id, sent in the clear when pairing.
    pub fn id(&self) -> TicketId {
        self.id
    }

    /// The desktop's PeerId.
    pub fn desktop(&self) -> &DeviceId {
        &self.desktop
    }

    /// The desktop's addresses as multiaddr text, in order of preference.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The one-time pairing secret.
    pub fn secret(&self) -> &TicketSecret {
        &self.secret
    }

    /// When the ticket stops working, in UTC milliseconds (always a whole second).
    pub fn expires_at(&self) -> Millis {
        self.expires_at
    }

    /// Whether the ticket has expired at `now_ms` (expiry instant included).
    pub fn is_expired(&self, now_ms: Millis) -> bool {
        now_ms >= self.expires_at
    }

    /// The binary form described in the module docs.
    fn to_binary(&self) -> Vec<u8> {
        let peer = self.desktop.to_bytes();
        let mut out = Vec::with_capacity(
            FIXED_LEN + 2 + peer.len() + self.addrs.iter().map(|a| 1 + a.len()).sum::<usize>(),
        );
        out.push(self.version);
        out.extend_from_slice(self.id.as_bytes());
        // Whole seconds by construction; `max(0)` and the cast only guard the invariant.
        out.extend_from_slice(&((self.expires_at.max(0) / 1000) as u64).to_be_bytes());
        out.extend_from_slice(self.secret.as_bytes());
        // A DeviceId is a multihash of at most 66 bytes, and each address is at most
        // MAX_TICKET_ADDR_LEN bytes, so these lengths fit in a byte.
        out.push(u8::try_from(peer.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&peer);
        out.push(u8::try_from(self.addrs.len()).unwrap_or(u8::MAX));
        for addr in &self.addrs {
            out.push(u8::try_from(addr.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(addr.as_bytes());
        }
        out
    }

    /// Parses the binary form. Never panics.
    fn from_binary(bytes: &[u8]) -> Result<Ticket, TicketError> {
        let mut r = Reader(bytes);
        let version = r.u8("version")?;
        if version != TICKET_VERSION {
            return Err(TicketError::UnsupportedVersion(version));
        }
        let id = TicketId(r.array("ticket id")?);
        let secs = u64::from_be_bytes(r.array("expiry")?);
        let expires_at = secs
            .checked_mul(1000)
            .and_then(|ms| Millis::try_from(ms).ok())
            .ok_or(TicketError::BadExpiry(secs))?;
        let secret = TicketSecret(r.array("secret")?);
        let peer_len = r.u8("desktop id length")?;
        let peer = r.take(usize::from(peer_len), "desktop id")?;
        let desktop = DeviceId::from_bytes(peer).map_err(TicketError::BadPeerId)?;
        let count = usize::from(r.u8("address count")?);
        if count > MAX_TICKET_ADDRS {
            return Err(TicketError::TooManyAddresses { count });
        }
        let mut addrs: Vec<String> = Vec::with_capacity(count);
        for index in 0..count {
            let len = r.u8("address length")?;
            let raw = r.take(usize::from(len), "address")?;
            check_addr(raw, &addrs)
                .map_err(|problem| TicketError::BadAddress { index, problem })?;
            let addr = std::str::from_utf8(raw).map_err(|_| TicketError::BadAddress {
                index,
                problem: AddrProblem::BadCharacter,
            })?;
            addrs.push(addr.to_owned());
        }
        if !r.0.is_empty() {
            return Err(TicketError::TrailingBytes { count: r.0.len() });
        }
        Ok(Ticket {
            version,
            id,
            desktop,
            addrs,
            secret,
            expires_at,
        })
    }
}

/// Checks one address against the rules of the text form and the addresses kept so far.
fn check_addr(raw: &[u8], earlier: &[String]) -> Result<(), AddrProblem> {
    if raw.is_empty() {
        return Err(AddrProblem::Empty);
    }
    if raw.len() > MAX_TICKET_ADDR_LEN {
        return Err(AddrProblem::TooLong);
    }
    if raw.first() != Some(&b'/') {
        return Err(AddrProblem::NotMultiaddr);
    }
    if !raw.iter().all(u8::is_ascii_graphic) {
        return Err(AddrProblem::BadCharacter);
    }
    if earlier.iter().any(|a| a.as_bytes() == raw) {
        return Err(AddrProblem::Duplicate);
    }
    Ok(())
}

/// Largest binary form whose text fits in [`MAX_TICKET_TEXT_LEN`]: base32 spends 8 characters
/// on every 5 bytes.
fn max_binary_len() -> usize {
    (MAX_TICKET_TEXT_LEN - TICKET_PREFIX.len()) * 5 / 8
}

/// Rounds non-negative milliseconds up to the next whole second, saturating at the largest
/// whole second that fits.
fn round_up_to_second(ms: Millis) -> Millis {
    ms.checked_add(999)
        .map(|m| m - m % 1000)
        .unwrap_or(Millis::MAX - Millis::MAX % 1000)
}

/// A cursor over the binary form whose reads fail with the name of the cut-off field.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], TicketError> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or(TicketError::Truncated { field })?;
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, TicketError> {
        let [b] = self.array(field)?;
        Ok(b)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], TicketError> {
        self.take(N, field)?
            .try_into()
            .map_err(|_| TicketError::Truncated { field })
    }
}

impl fmt::Display for Ticket {
    /// The text form: `errand:` and upper-case base32. It contains the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(TICKET_PREFIX)?;
        f.write_str(&BASE32_NOPAD.encode(&self.to_binary()))
    }
}

impl FromStr for Ticket {
    type Err = TicketError;

    /// Parses the text form. Surrounding whitespace is ignored, and so is the case of the
    /// prefix and of the base32 (some scanners and deep-link handlers change case).
    fn from_str(s: &str) -> Result<Self, TicketError> {
        let s = s.trim();
        if s.len() > MAX_TICKET_TEXT_LEN {
            return Err(TicketError::TooLong { len: s.len() });
        }
        let prefix = TICKET_PREFIX.as_bytes();
        let has_prefix = s
            .as_bytes()
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix));
        // The prefix is ASCII, so slicing after it lands on a character boundary.
        let body = match s.get(prefix.len()..) {
            Some(body) if has_prefix => body,
            _ => return Err(TicketError::MissingPrefix),
        };
        let binary = BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(TicketError::Base32)?;
        Ticket::from_binary(&binary)
    }
}

impl TryFrom<&str> for Ticket {
    type Error = TicketError;
    fn try_from(s: &str) -> Result<Self, TicketError> {
        s.parse()
    }
}

impl TryFrom<String> for Ticket {
    type Error = TicketError;
    fn try_from(s: String) -> Result<Self, TicketError> {
        s.parse()
    }
}

impl From<Ticket> for String {
    fn from(t: Ticket) -> String {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::ids::tests::{PEER_A, PEER_B, PEER_QM};

    const NOW: Millis = 1_700_000_000_123;
    const TEN_MIN: Millis = 10 * 60 * 1000;
    const LAN: &str = "/ip4/192.168.1.5/tcp/40001";
    const LAN6: &str = "/ip6/fd00::1234:5678/tcp/40001";

    fn relay_addr() -> String {
        format!("/ip4/203.0.113.7/tcp/4001/p2p/{PEER_B}/p2p-circuit")
    }

    fn peer() -> DeviceId {
        PEER_A.parse().unwrap()
    }

    fn sample() -> Ticket {
        Ticket::new(peer(), [LAN.to_owned(), relay_addr()], TEN_MIN, NOW)
    }

    /// Builds `errand:` + base32 of `bytes`, for feeding hand-made binaries to the parser.
    fn text_of(bytes: &[u8]) -> String {
        format!("{TICKET_PREFIX}{}", BASE32_NOPAD.encode(bytes))
    }

    /// A valid binary with the given address section (count byte + entries).
    fn binary_with_addrs(addr_section: &[u8]) -> Vec<u8> {
        let mut b = sample().to_binary();
        let peer = peer().to_bytes();
        b.truncate(FIXED_LEN + 1 + peer.len());
        b.extend_from_slice(addr_section);
        b
    }

    #[test]
    fn test_peer_id_parses_as_device_id() {
        let id: DeviceId = PEER_A.parse().unwrap();
        assert_eq!(
            id.to_bytes().len(),
            38,
            "inlined Ed25519 key: 0x00 0x24 + 36 bytes"
        );
    }

    #[test]
    fn ticket_round_trips_through_text() {
        let t = sample();
        let text = t.to_string();
        assert!(text.starts_with("errand:"));
        assert!(!text.chars().any(char::is_whitespace));
        assert_eq!(text.parse::<Ticket>().unwrap(), t);
        assert_eq!(Ticket::try_from(text.as_str()).unwrap(), t);
        assert_eq!(t.version(), TICKET_VERSION);
        assert_eq!(t.desktop(), &peer());
        assert_eq!(t.addrs(), &[LAN.to_owned(), relay_addr()]);
        assert_eq!(
            t.expires_at(),
            1_700_000_601_000,
            "rounded up to a whole second"
        );
    }

    #[test]
    fn ticket_round_trips_through_serde_as_its_text() {
        let t = sample();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, format!("\"{t}\""));
        assert_eq!(serde_json::from_str::<Ticket>(&json).unwrap(), t);
        assert!(serde_json::from_str::<Ticket>("\"errand:AAAA\"").is_err());
    }

    #[test]
    fn parsing_ignores_case_and_surrounding_whitespace() {
        let t = sample();
        let text = t.to_string();
        assert_eq!(format!("  {text}\n").parse::<Ticket>().unwrap(), t);
        assert_eq!(text.to_ascii_uppercase().parse::<Ticket>().unwrap(), t);
        assert_eq!(text.to_ascii_lowercase().parse::<Ticket>().unwrap(), t);
    }

    #[test]
    fn tickets_get_fresh_ids_and_secrets() {
        let (a, b) = (sample(), sample());
        assert_ne!(a.id(), b.id());
        assert_ne!(a.secret(), b.secret());
    }

    #[test]
    fn secret_debug_is_redacted_everywhere() {
        let t = sample();
        assert_eq!(format!("{:?}", t.secret()), "TicketSecret(<redacted>)");
        let dbg = format!("{t:?}");
        assert!(dbg.contains("<redacted>"));
        let hex: String = t
            .secret()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!dbg.contains(&hex));
        assert!(!dbg.contains(&format!("{:?}", t.secret().as_bytes())));
    }

    #[test]
    fn ticket_id_displays_as_hex() {
        let id = TicketId::from_bytes([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(id.to_string(), "0123456789abcdef");
        assert_eq!(format!("{id:?}"), "TicketId(0123456789abcdef)");
        assert_eq!(
            id.as_bytes(),
            &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]
        );
    }

    #[test]
    fn expiry_is_inclusive_and_rounded_up() {
        let t = sample();
        assert!(!t.is_expired(NOW));
        assert!(!t.is_expired(t.expires_at() - 1));
        assert!(t.is_expired(t.expires_at()));
        let exact = Ticket::new(peer(), [LAN], 1_000, 5_000);
        assert_eq!(exact.expires_at(), 6_000);
        let past = Ticket::new(peer(), [LAN], -10_000, 5_000);
        assert_eq!(past.expires_at(), 0, "never before the epoch");
        let far = Ticket::new(peer(), [LAN], Millis::MAX, Millis::MAX);
        assert_eq!(far.to_string().parse::<Ticket>().unwrap(), far);
    }

    #[test]
    fn constructor_dedups_drops_bad_addresses_and_keeps_order() {
        let long = format!("/{}", "a".repeat(MAX_TICKET_ADDR_LEN));
        let t = Ticket::new(
            peer(),
            [
                LAN,
                "",
                "ip4/1.2.3.4",
                "/ip4/1.2.3.4 /tcp/1",
                "/ip4/é",
                long.as_str(),
                LAN,
                LAN6,
                "/dns/a/tcp/1",
                "/dns/b/tcp/1",
                "/dns/c/tcp/1",
            ],
            TEN_MIN,
            NOW,
        );
        assert_eq!(t.addrs(), &[LAN, LAN6, "/dns/a/tcp/1", "/dns/b/tcp/1"]);
        let none = Ticket::new(peer(), Vec::<String>::new(), TEN_MIN, NOW);
        assert!(none.addrs().is_empty());
        assert_eq!(none.to_string().parse::<Ticket>().unwrap(), none);
    }

    #[test]
    fn constructor_never_exceeds_the_text_limit() {
        let big: Vec<String> = (0..10)
            .map(|i| format!("/dns/{i}{}", "x".repeat(MAX_TICKET_ADDR_LEN - 10)))
            .collect();
        for id in [PEER_A, PEER_QM] {
            let t = Ticket::new(id.parse().unwrap(), &big, TEN_MIN, NOW);
            let text = t.to_string();
            assert!(text.len() <= MAX_TICKET_TEXT_LEN, "{} chars", text.len());
            assert!(!t.addrs().is_empty() && t.addrs().len() < MAX_TICKET_ADDRS);
            assert_eq!(text.parse::<Ticket>().unwrap(), t);
        }
    }

    #[test]
    fn realistic_ticket_text_stays_small() {
        let lan2 = Ticket::new(peer(), [LAN, "/ip4/10.0.0.2/tcp/40001"], TEN_MIN, NOW).to_string();
        let lan_relay = sample().to_string();
        let lan1 = Ticket::new(peer(), [LAN], TEN_MIN, NOW).to_string();
        println!("ticket text length: 1 LAN addr = {} chars", lan1.len());
        println!("ticket text length: 2 LAN addrs = {} chars", lan2.len());
        println!(
            "ticket text length: LAN + relay circuit = {} chars",
            lan_relay.len()
        );
        assert!(lan1.len() < 200, "{} chars", lan1.len());
        assert!(lan2.len() < 250, "{} chars", lan2.len());
        assert!(lan_relay.len() < 350, "{} chars", lan_relay.len());
    }

    #[test]
    fn missing_prefix_is_reported() {
        for bad in [
            "",
            "   ",
            "errand",
            "errand;AAAA",
            "https://x/errand:AAAA",
            "érrand:AAAA",
            "e",
        ] {
            assert_eq!(
                bad.parse::<Ticket>(),
                Err(TicketError::MissingPrefix),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn too_long_text_is_refused_before_decoding() {
        let long = format!("errand:{}", "A".repeat(MAX_TICKET_TEXT_LEN));
        assert_eq!(
            long.parse::<Ticket>(),
            Err(TicketError::TooLong { len: long.len() })
        );
        let junk = "é".repeat(MAX_TICKET_TEXT_LEN);
        assert!(matches!(
            junk.parse::<Ticket>(),
            Err(TicketError::TooLong { .. })
        ));
    }

    #[test]
    fn bad_base32_is_reported() {
        for bad in [
            "errand:A",
            "errand:AB=",
            "errand:18AA",
            "errand:AB CD",
            "errand:AÉ",
        ] {
            assert!(
                matches!(bad.parse::<Ticket>(), Err(TicketError::Base32(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn truncation_names_the_field() {
        let binary = sample().to_binary();
        let peer_len = peer().to_bytes().len();
        let cases = [
            (0, "version"),
            (1, "ticket id"),
            (8, "ticket id"),
            (9, "expiry"),
            (17, "secret"),
            (FIXED_LEN, "desktop id length"),
            (FIXED_LEN + 1, "desktop id"),
            (FIXED_LEN + 1 + peer_len, "address count"),
            (FIXED_LEN + 2 + peer_len, "address length"),
            (FIXED_LEN + 3 + peer_len, "address"),
        ];
        for (len, field) in cases {
            assert_eq!(
                text_of(&binary[..len]).parse::<Ticket>(),
                Err(TicketError::Truncated { field }),
                "cut at {len}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_reported() {
        let mut binary = sample().to_binary();
        binary.extend_from_slice(&[0, 0, 0]);
        assert_eq!(
            text_of(&binary).parse::<Ticket>(),
            Err(TicketError::TrailingBytes { count: 3 })
        );
    }

    #[test]
    fn unknown_version_asks_to_update() {
        let mut binary = sample().to_binary();
        binary[0] = 2;
        let err = text_of(&binary).parse::<Ticket>().unwrap_err();
        assert_eq!(err, TicketError::UnsupportedVersion(2));
        assert!(err.to_string().contains("update Errand"), "{err}");
        // A newer version may use any layout: the version byte alone decides.
        assert_eq!(
            text_of(&[7]).parse::<Ticket>(),
            Err(TicketError::UnsupportedVersion(7))
        );
    }

    #[test]
    fn out_of_range_expiry_is_reported() {
        let mut binary = sample().to_binary();
        binary[9..17].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(
            text_of(&binary).parse::<Ticket>(),
            Err(TicketError::BadExpiry(u64::MAX))
        );
    }

    #[test]
    fn bad_peer_id_is_reported() {
        let mut binary = sample().to_binary();
        binary[FIXED_LEN + 1] = 0x55; // not a multihash code we accept
        assert!(matches!(
            text_of(&binary).parse::<Ticket>(),
            Err(TicketError::BadPeerId(_))
        ));
        let mut empty = binary[..FIXED_LEN].to_vec();
        empty.extend_from_slice(&[0, 0]); // zero-length peer id, no addresses
        assert!(matches!(
            text_of(&empty).parse::<Ticket>(),
            Err(TicketError::BadPeerId(_))
        ));
    }

    #[test]
    fn too_many_addresses_are_reported() {
        let text = text_of(&binary_with_addrs(&[5]));
        assert_eq!(
            text.parse::<Ticket>(),
            Err(TicketError::TooManyAddresses { count: 5 })
        );
    }

    #[test]
    fn each_bad_address_is_reported() {
        let long = [b"/".as_slice(), &[b'a'; MAX_TICKET_ADDR_LEN]].concat();
        let mut too_long = vec![1, u8::try_from(long.len()).unwrap()];
        too_long.extend_from_slice(&long);
        let cases: [(Vec<u8>, usize, AddrProblem); 6] = [
            (vec![1, 0], 0, AddrProblem::Empty),
            (too_long, 0, AddrProblem::TooLong),
            ([&[1, 3][..], b"ip4"].concat(), 0, AddrProblem::NotMultiaddr),
            (
                [&[1, 4][..], b"/a b"].concat(),
                0,
                AddrProblem::BadCharacter,
            ),
            (
                [&[1, 3][..], b"/\xc3\xa9"].concat(),
                0,
                AddrProblem::BadCharacter,
            ),
            (
                [&[2, 2][..], b"/a", &[2], b"/a"].concat(),
                1,
                AddrProblem::Duplicate,
            ),
        ];
        for (section, index, problem) in cases {
            let err = text_of(&binary_with_addrs(&section))
                .parse::<Ticket>()
                .unwrap_err();
            assert_eq!(err, TicketError::BadAddress { index, problem });
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn every_error_message_reads_as_a_sentence() {
        let errors = [
            TicketError::MissingPrefix,
            TicketError::TooLong { len: 2000 },
            "errand:1".parse::<Ticket>().unwrap_err(),
            TicketError::Truncated { field: "secret" },
            TicketError::TrailingBytes { count: 1 },
            TicketError::UnsupportedVersion(9),
            TicketError::BadExpiry(u64::MAX),
            TicketError::BadPeerId(DeviceId::from_bytes(&[]).unwrap_err()),
            TicketError::TooManyAddresses { count: 9 },
            TicketError::BadAddress {
                index: 0,
                problem: AddrProblem::Duplicate,
            },
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(msg.contains("ticket"), "{msg}");
            assert!(!msg.contains("Some("), "{msg}");
        }
    }

    /// Parses anything; if it succeeds, the ticket must survive a round trip.
    fn parse_never_panics(text: &str) {
        if let Ok(t) = text.parse::<Ticket>() {
            assert_eq!(
                t.to_string().parse::<Ticket>().as_ref(),
                Ok(&t),
                "from {text:?}"
            );
        }
    }

    #[test]
    fn parser_survives_every_mutation_of_a_valid_ticket() {
        let text = sample().to_string();
        let binary = sample().to_binary();
        let replacements = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567abz018=:/ \n\0é€😀";
        let mut runs = 0usize;
        for (i, _) in text.char_indices() {
            // truncation, deletion, substitution, insertion
            parse_never_panics(&text[..i]);
            parse_never_panics(&format!("{}{}", &text[..i], &text[i + 1..]));
            for c in replacements.chars() {
                parse_never_panics(&format!("{}{c}{}", &text[..i], &text[i + 1..]));
                parse_never_panics(&format!("{}{c}{}", &text[..i], &text[i..]));
                runs += 4;
            }
        }
        for i in 0..binary.len() {
            parse_never_panics(&text_of(&binary[..i]));
            for bit in 0..8 {
                let mut flipped = binary.clone();
                flipped[i] ^= 1 << bit;
                parse_never_panics(&text_of(&flipped));
            }
            for byte in [0u8, 1, 4, 5, 0x2f, 0x7f, 0xff] {
                let mut set = binary.clone();
                set[i] = byte;
                parse_never_panics(&text_of(&set));
            }
            runs += 16;
        }
        assert!(runs > 10_000, "{runs}");
    }

    #[test]
    fn parser_survives_random_inputs() {
        let mut rng = StdRng::seed_from_u64(0x00e7_7a4d);
        let valid = sample().to_binary();
        for _ in 0..5_000 {
            let len = rng.random_range(0..1200);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            parse_never_panics(&String::from_utf8_lossy(&bytes));
            // Random binaries behind a valid prefix, and ones starting like a real ticket so
            // that the deeper fields get exercised.
            let body_len = rng.random_range(0..300);
            let mut body: Vec<u8> = (0..body_len).map(|_| rng.random()).collect();
            parse_never_panics(&text_of(&body));
            let keep = rng.random_range(0..=valid.len());
            body.splice(0..0, valid[..keep].iter().copied());
            parse_never_panics(&text_of(&body));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn parser_never_panics_on_arbitrary_text(s in "\\PC{0,1100}") {
            parse_never_panics(&s);
        }

        #[test]
        fn parser_never_panics_on_arbitrary_base32(s in "(?i)(errand:)?[A-Z2-7=]{0,400}") {
            parse_never_panics(&s);
        }

        #[test]
        fn parser_never_panics_on_binaries_with_a_valid_head(
            head in 0usize..120,
            tail in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let mut bytes = sample().to_binary();
            bytes.truncate(head);
            bytes.extend_from_slice(&tail);
            parse_never_panics(&text_of(&bytes));
        }

        #[test]
        fn any_constructed_ticket_round_trips(
            addrs in proptest::collection::vec("\\PC{0,210}", 0..8),
            ttl in any::<i64>(),
            now in any::<i64>(),
        ) {
            let t = Ticket::new(peer(), &addrs, ttl, now);
            let text = t.to_string();
            prop_assert!(text.len() <= MAX_TICKET_TEXT_LEN);
            prop_assert!(t.addrs().len() <= MAX_TICKET_ADDRS);
            prop_assert_eq!(text.parse::<Ticket>(), Ok(t));
        }
    }
}
