//! The relay's rendezvous policy: a discover must name its namespace.
//!
//! The rendezvous protocol lets a DISCOVER omit the namespace, and libp2p-rendezvous 0.18's
//! server then answers with every registration it holds: each device's namespace, PeerId and
//! circuit address, to anyone who connects. An Errand namespace is only known to the devices of
//! one pairing, so a discover without one has no honest use.
//!
//! - [`Behaviour`] wraps `rendezvous::server::Behaviour` and sits between it and its connection
//!   handlers. It looks at each inbound request before the server does; a discover without a
//!   namespace never reaches the server.
//! - The refusal drops the request's reply channel: the handler closes the stream without an
//!   answer, and the client sees its discover fail (libp2p's client reports
//!   `DiscoverFailed { error: Unavailable }`). The handler then reports the omitted reply, which
//!   is swallowed here because the server never saw the request.
//! - The server's request type is private to libp2p-rendezvous, so the only way to tell what a
//!   request is, is its derived `Debug` text. The check reads a bounded prefix of it and refuses
//!   every discover that does not show `namespace: Some(…)`. The relay tests exercise it against
//!   the real client, so a libp2p upgrade that changes the text fails there.

use std::{
    collections::HashMap,
    fmt::{self, Write as _},
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr, PeerId,
    core::{Endpoint, transport::PortUse},
    rendezvous,
    request_response::InboundRequestId,
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
    },
};
use tracing::{debug, info};

/// The server this module wraps.
type Server = rendezvous::server::Behaviour;

/// What the server's connection handler reports: libp2p-request-response's handler event, which
/// is public but not re-exported, so it is named through the server's handler type.
type ServerHandlerEvent = THandlerOutEvent<Server>;

/// How much of a request's `Debug` text is read: `Discover { namespace: Some(` is 28 bytes, and
/// a register request (a signed peer record) is never formatted further than this.
const INSPECTED_DEBUG_BYTES: usize = 64;

/// The `Debug` text every discover request starts with.
const DISCOVER_DEBUG_PREFIX: &str = "Discover {";

/// The `Debug` text of a discover that names its namespace.
const DISCOVER_WITH_NAMESPACE_DEBUG_PREFIX: &str = "Discover { namespace: Some(";

/// A rendezvous server that refuses to list registrations across namespaces.
pub(super) struct Behaviour {
    server: Server,
    /// Requests refused here, by the connection they came on, until the handler reports the
    /// reply it omitted. At most the handler's concurrent-stream limit per connection, and
    /// cleared when the connection closes.
    refused: HashMap<InboundRequestId, ConnectionId>,
}

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("namespace_gate::Behaviour")
            .field("refused", &self.refused.len())
            .finish_non_exhaustive()
    }
}

impl Behaviour {
    /// Wraps a rendezvous server with `config`.
    pub(super) fn new(config: rendezvous::server::Config) -> Self {
        Self {
            server: Server::new(config),
            refused: HashMap::new(),
        }
    }
}

/// True for a discover request that names no namespace, judged from the request's `Debug`
/// text. Anything that reads as a discover without `namespace: Some(` counts, so a change in the
/// text refuses rather than leaks.
fn is_discover_without_namespace(request: &impl fmt::Debug) -> bool {
    let mut text = BoundedText::default();
    // Stops with an error once the bound is reached; the prefix is all that is needed.
    let _ = write!(text, "{request:?}");
    text.0.starts_with(DISCOVER_DEBUG_PREFIX)
        && !text.0.starts_with(DISCOVER_WITH_NAMESPACE_DEBUG_PREFIX)
}

/// A `fmt::Write` sink that keeps at most [`INSPECTED_DEBUG_BYTES`] and then fails, which
/// stops the formatting of a large request early.
#[derive(Default)]
struct BoundedText(String);

impl fmt::Write for BoundedText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = INSPECTED_DEBUG_BYTES.saturating_sub(self.0.len());
        if s.len() <= room {
            self.0.push_str(s);
            return Ok(());
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.0.push_str(&s[..end]);
        Err(fmt::Error)
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = THandler<Server>;
    type ToSwarm = rendezvous::server::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.server
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.server.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.server.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.server.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(closed) = &event {
            self.refused
                .retain(|_, connection| *connection != closed.connection_id);
        }
        self.server.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            ServerHandlerEvent::Request {
                request_id,
                request,
                sender,
            } if is_discover_without_namespace(&request) => {
                // Dropping the reply channel makes the handler close the stream unanswered.
                drop(sender);
                self.refused.insert(request_id, connection);
                info!(%peer, "refused a rendezvous discover without a namespace");
            }
            // The reply the handler omitted for a request refused above: the server never saw
            // that request, so it must not see its end either.
            ServerHandlerEvent::ResponseOmission(request_id)
                if self.refused.remove(&request_id).is_some() =>
            {
                debug!(%peer, "closed a refused rendezvous discover");
            }
            other => {
                if let ServerHandlerEvent::InboundStreamFailed { request_id, .. }
                | ServerHandlerEvent::InboundTimeout(request_id) = &other
                {
                    self.refused.remove(request_id);
                }
                self.server
                    .on_connection_handler_event(peer, connection, other);
            }
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.server.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stand-ins with the same derived `Debug` shape as libp2p-rendezvous's request.
    #[derive(Debug)]
    struct Namespace(#[allow(dead_code)] String);

    #[derive(Debug)]
    #[allow(dead_code)]
    enum Message {
        Register(String),
        Discover {
            namespace: Option<Namespace>,
            cookie: Option<u64>,
            limit: Option<u64>,
        },
    }

    #[test]
    fn only_a_discover_without_a_namespace_is_refused() {
        let all = Message::Discover {
            namespace: None,
            cookie: None,
            limit: Some(10),
        };
        assert!(is_discover_without_namespace(&all));
        let named = Message::Discover {
            namespace: Some(Namespace("errand-abc".into())),
            cookie: None,
            limit: None,
        };
        assert!(!is_discover_without_namespace(&named));
        // A huge request is read only as far as the bound.
        let register = Message::Register("x".repeat(1_000_000));
        assert!(!is_discover_without_namespace(&register));
    }

    #[test]
    fn bounded_text_stops_at_its_bound_on_a_character_boundary() {
        let mut text = BoundedText::default();
        assert!(write!(text, "{}", "é".repeat(INSPECTED_DEBUG_BYTES)).is_err());
        assert!(text.0.len() <= INSPECTED_DEBUG_BYTES);
        assert!(text.0.chars().all(|c| c == 'é'));
    }
}
