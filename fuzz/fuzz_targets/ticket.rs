//! A pairing ticket, as pasted or scanned: a refusal is an error value, and a ticket that
//! parses prints back to text that parses to the same ticket.
#![no_main]

use errand_core::Ticket;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(ticket) = text.parse::<Ticket>() else {
        return;
    };
    let again: Ticket = ticket
        .to_string()
        .parse()
        .expect("a ticket's own text parses");
    assert_eq!(again, ticket);
});
