//! The pairing ticket (placeholder: being written).

/// A pairing ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket;

/// Why a ticket did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Placeholder.
    #[error("invalid ticket")]
    Invalid,
}
