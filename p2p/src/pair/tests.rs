//! Unit tests of the handshake, over an in-memory pipe.

use std::{cell::Cell, collections::HashMap, str::FromStr};

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::Keypair;
use serde_json::json;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use errand_core::limits::MAX_SHORT_TEXT_BYTES;
use errand_core::{
    DeviceId, DeviceKind, Ticket,
    ticket::{TicketId, TicketSecret},
};
use libp2p::PeerId;
use std::{io, time::Duration};

use super::{handshake::*, messages::*};

type Pipe = Compat<tokio::io::DuplexStream>;

/// Short enough to keep the timeout tests fast, long enough for the in-memory happy path.
const TEST_STEP: Duration = Duration::from_millis(300);

fn peer() -> PeerId {
    Keypair::generate_ed25519().public().to_peer_id()
}

fn ticket_for(desktop: PeerId) -> Ticket {
    let now = 1_700_000_000_000;
    Ticket::new(
        DeviceId::from_str(&desktop.to_base58()).unwrap(),
        ["/ip4/127.0.0.1/tcp/1"],
        60_000,
        now,
    )
}

fn pipe() -> (Pipe, Pipe) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    (a.compat(), b.compat())
}

fn hello() -> PhoneHello {
    PhoneHello {
        name: "Ada's phone".into(),
        kind: DeviceKind::Phone,
        actor: "00112233445566778899aabbccddeeff".into(),
    }
}

fn welcome() -> Welcome {
    Welcome {
        name: "Ada's laptop".into(),
        kind: DeviceKind::Desktop,
        actor: "ffeeddccbbaa99887766554433221100".into(),
        genesis: json!({"thread_id": "01HZZZ", "owner_actor": "ff"}),
        discovery_secret: [7; 32],
        executors: vec!["claude".into(), "shell".into()],
    }
}

/// An in-memory store: consumes tickets on accept, records everything.
#[derive(Default)]
struct Book {
    live: HashMap<TicketId, TicketSecret>,
    failures: Vec<TicketId>,
    accepted: Vec<(TicketId, PeerId, PhoneHello)>,
    refuse: Option<String>,
}

impl Book {
    fn with(ticket: &Ticket) -> Self {
        let mut book = Book::default();
        book.live.insert(ticket.id(), ticket.secret().clone());
        book
    }
}

impl TicketBook for Book {
    type Genesis = serde_json::Value;

    fn secret(&mut self, id: &TicketId) -> Option<TicketSecret> {
        self.live.get(id).cloned()
    }

    fn record_failure(&mut self, id: &TicketId) {
        self.failures.push(*id);
    }

    fn accept(
        &mut self,
        id: &TicketId,
        phone: PeerId,
        hello: &PhoneHello,
    ) -> Result<Welcome, String> {
        if let Some(reason) = &self.refuse {
            return Err(reason.clone());
        }
        self.live.remove(id);
        self.accepted.push((*id, phone, hello.clone()));
        Ok(welcome())
    }
}

/// Runs both sides over one pipe; `claimed_desktop` and `seen_phone` let a test make the two
/// sides disagree on PeerIds.
async fn run(
    ticket: &Ticket,
    book: &mut Book,
    desktop: PeerId,
    phone: PeerId,
    claimed_desktop: PeerId,
    seen_phone: PeerId,
    store: impl FnOnce(&Welcome) -> Result<(), String>,
) -> (Result<Paired, PairError>, Result<Welcome, PairError>) {
    let (mut d, mut p) = pipe();
    let hello = hello();
    tokio::join!(
        respond_with(&mut d, desktop, seen_phone, book, TEST_STEP),
        initiate_with(
            &mut p,
            ticket,
            claimed_desktop,
            phone,
            &hello,
            store,
            TEST_STEP
        ),
    )
}

async fn pair_normally(
    ticket: &Ticket,
    book: &mut Book,
    desktop: PeerId,
    phone: PeerId,
) -> (Result<Paired, PairError>, Result<Welcome, PairError>) {
    run(ticket, book, desktop, phone, desktop, phone, |_| Ok(())).await
}

#[tokio::test]
async fn pairing_gives_each_side_the_others_details() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let mut book = Book::with(&ticket);
    let stored = Cell::new(false);
    let (d, p) = run(&ticket, &mut book, desktop, phone, desktop, phone, |w| {
        assert_eq!(w, &welcome());
        stored.set(true);
        Ok(())
    })
    .await;

    let paired = d.unwrap();
    assert_eq!(paired.ticket, ticket.id());
    assert_eq!(paired.phone, phone);
    assert_eq!(paired.hello, hello());
    assert!(matches!(paired.ack, PhoneAck::Stored));
    assert!(paired.confirmed());
    assert_eq!(p.unwrap(), welcome());
    assert!(stored.get());
    assert_eq!(book.accepted, vec![(ticket.id(), phone, hello())]);
    assert!(book.failures.is_empty());
    assert!(book.live.is_empty(), "ticket consumed");
}

#[tokio::test]
async fn a_ticket_pairs_only_once() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let mut book = Book::with(&ticket);
    let (d, p) = pair_normally(&ticket, &mut book, desktop, phone).await;
    assert!(d.is_ok() && p.is_ok());

    let (d, p) = pair_normally(&ticket, &mut book, desktop, peer()).await;
    assert!(matches!(d, Err(PairError::UnknownTicket(id)) if id == ticket.id()));
    assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
    assert_eq!(book.accepted.len(), 1);
}

#[tokio::test]
async fn one_flipped_secret_bit_fails_both_sides_and_counts_a_try() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let mut secret = *ticket.secret().as_bytes();
    secret[17] ^= 0x04;
    let mut book = Book::default();
    book.live
        .insert(ticket.id(), TicketSecret::from_bytes(secret));
    let called = Cell::new(false);
    let (d, p) = run(&ticket, &mut book, desktop, phone, desktop, phone, |_| {
        called.set(true);
        Ok(())
    })
    .await;

    assert!(matches!(d, Err(PairError::WrongSecret)), "{d:?}");
    assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
    assert_eq!(book.failures, vec![ticket.id()]);
    assert!(book.accepted.is_empty());
    assert!(!called.get());
    assert_eq!(
        book.live.len(),
        1,
        "the caller, not this module, kills tickets"
    );
}

#[tokio::test]
async fn unknown_ticket_is_refused_without_counting_a_try() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let mut book = Book::default();
    let (d, p) = pair_normally(&ticket, &mut book, desktop, phone).await;

    assert!(matches!(d, Err(PairError::UnknownTicket(id)) if id == ticket.id()));
    assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
    assert!(book.failures.is_empty() && book.accepted.is_empty());
}

#[tokio::test]
async fn phone_that_dialled_another_desktop_fails_the_handshake() {
    // The phone believes it talks to `other` (and holds a ticket naming it), but the stream
    // ends at `desktop`, which knows the same ticket id and secret: the prologues differ.
    let (desktop, phone, other) = (peer(), peer(), peer());
    let ticket = ticket_for(other);
    let mut book = Book::with(&ticket);
    let (d, p) = run(&ticket, &mut book, desktop, phone, other, phone, |_| Ok(())).await;

    assert!(matches!(d, Err(PairError::WrongSecret)), "{d:?}");
    assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
    assert_eq!(book.failures, vec![ticket.id()]);
    assert!(book.accepted.is_empty());
}

#[tokio::test]
async fn handshake_relayed_from_another_phone_fails() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let mut book = Book::with(&ticket);
    let (d, p) = run(&ticket, &mut book, desktop, phone, desktop, peer(), |_| {
        Ok(())
    })
    .await;

    assert!(matches!(d, Err(PairError::WrongSecret)), "{d:?}");
    assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
    assert!(book.accepted.is_empty());
}

#[tokio::test]
async fn ticket_for_another_desktop_is_refused_before_sending_anything() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(peer());
    let (mut d, mut p) = pipe();
    let err = initiate_with(
        &mut p,
        &ticket,
        desktop,
        phone,
        &hello(),
        |_: &Welcome| Ok(()),
        TEST_STEP,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PairError::WrongDesktop { .. }), "{err:?}");
    assert!(err.to_string().contains("scan the code"), "{err}");
    drop(p);
    let mut rest = Vec::new();
    d.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "nothing was sent");
}

#[tokio::test]
async fn desktop_rejection_reaches_the_phone_and_persists_nothing() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let mut book = Book::with(&ticket);
    book.refuse = Some("this desktop already has 8 phones; revoke one first".into());
    let (d, p) = pair_normally(&ticket, &mut book, desktop, phone).await;

    assert!(
        matches!(&d, Err(PairError::Rejected(r)) if r.contains("8 phones")),
        "{d:?}"
    );
    assert!(
        matches!(&p, Err(PairError::Rejected(r)) if r.contains("8 phones")),
        "{p:?}"
    );
    assert!(book.accepted.is_empty() && book.failures.is_empty());
    assert_eq!(book.live.len(), 1);
}

#[tokio::test]
async fn phone_that_cannot_save_tells_the_desktop() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let mut book = Book::with(&ticket);
    let (d, p) = run(&ticket, &mut book, desktop, phone, desktop, phone, |_| {
        Err("disk full".into())
    })
    .await;

    let paired = d.unwrap();
    assert!(matches!(&paired.ack, PhoneAck::NotStored(r) if r == "disk full"));
    assert!(!paired.confirmed());
    assert!(
        matches!(&p, Err(PairError::NotSaved(r)) if r == "disk full"),
        "{p:?}"
    );
    assert_eq!(
        book.accepted.len(),
        1,
        "the desktop trusted the phone anyway"
    );
}

#[tokio::test]
async fn invalid_hello_is_refused_locally() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    for bad in [
        PhoneHello {
            name: "x".repeat(MAX_SHORT_TEXT_BYTES + 1),
            ..hello()
        },
        PhoneHello {
            name: " ".into(),
            ..hello()
        },
        PhoneHello {
            actor: "xyz".into(),
            ..hello()
        },
        PhoneHello {
            actor: "a".repeat(2 * MAX_ACTOR_BYTES + 2),
            ..hello()
        },
    ] {
        let (_d, mut p) = pipe();
        let err = initiate_with(
            &mut p,
            &ticket,
            desktop,
            phone,
            &bad,
            |_: &Welcome| Ok(()),
            TEST_STEP,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PairError::Invalid(_)), "{err:?}");
    }
}

/// A phone that holds the secret but sends `payload` as its hello.
async fn rogue_phone(
    io: &mut Pipe,
    ticket: &Ticket,
    desktop: PeerId,
    phone: PeerId,
    payload: &[u8],
) -> Vec<u8> {
    let mut noise = snow::Builder::new(noise_params().unwrap())
        .psk(0, ticket.secret().as_bytes())
        .unwrap()
        .prologue(&prologue(&desktop, &phone))
        .unwrap()
        .build_initiator()
        .unwrap();
    write_frame(io, ticket.id().as_bytes(), "id", TEST_STEP)
        .await
        .unwrap();
    let mut msg = vec![0u8; MAX_FRAME];
    let len = noise.write_message(payload, &mut msg).unwrap();
    write_frame(io, &msg[..len], "hello", TEST_STEP)
        .await
        .unwrap();
    let reply = read_frame(io, MAX_FRAME, "reply", TEST_STEP)
        .await
        .unwrap()
        .unwrap();
    let len = noise.read_message(&reply, &mut msg).unwrap();
    msg.truncate(len);
    msg
}

#[tokio::test]
async fn hello_that_decrypts_but_is_malformed_is_rejected_without_a_try() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    for payload in [
        b"not json".to_vec(),
        br#"{"name":"a","kind":"toaster","actor":"00"}"#.to_vec(),
        br#"{"name":"a","kind":"phone","actor":"0g"}"#.to_vec(),
    ] {
        let mut book = Book::with(&ticket);
        let (mut d, mut p) = pipe();
        let (res, reply) = tokio::join!(
            respond_with(&mut d, desktop, phone, &mut book, TEST_STEP),
            rogue_phone(&mut p, &ticket, desktop, phone, &payload),
        );
        assert!(matches!(res, Err(PairError::Protocol(_))), "{res:?}");
        let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert!(reply["rejected"]["reason"].is_string(), "{reply}");
        assert!(book.accepted.is_empty() && book.failures.is_empty());
    }
}

/// Runs the desktop against raw bytes from a fake phone, which then closes.
async fn desktop_against(bytes: &[u8], book: &mut Book) -> Result<Paired, PairError> {
    let (mut d, mut p) = pipe();
    p.write_all(bytes).await.unwrap();
    p.close().await.unwrap();
    respond_with(&mut d, peer(), peer(), book, TEST_STEP).await
}

#[tokio::test]
async fn garbage_from_the_phone_is_an_error_not_a_panic() {
    let ticket = ticket_for(peer());
    let id = *ticket.id().as_bytes();
    let frame = |body: &[u8]| [&(body.len() as u16).to_be_bytes()[..], body].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty stream", vec![]),
        ("text", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("oversize id frame", vec![0xff, 0xff]),
        ("short id frame", frame(&id[..7])),
        ("half a length", vec![0]),
        ("cut id frame", vec![0, 8, 1, 2, 3]),
        ("id then nothing", frame(&id)),
        (
            "id then cut message",
            [frame(&id), vec![0, 200, 1, 2]].concat(),
        ),
    ];
    for (name, bytes) in cases {
        let mut book = Book::with(&ticket);
        let res = desktop_against(&bytes, &mut book).await;
        assert!(
            matches!(res, Err(PairError::Protocol(_))),
            "{name}: {res:?}"
        );
        assert!(book.failures.is_empty(), "{name}");
        assert!(book.accepted.is_empty(), "{name}");
    }
    // A message of the right id but random or too short bytes counts as a wrong try.
    for (name, msg) in [("random", vec![0x5a; 120]), ("short", vec![1, 2, 3])] {
        let mut book = Book::with(&ticket);
        let res = desktop_against(&[frame(&id), frame(&msg)].concat(), &mut book).await;
        assert!(
            matches!(res, Err(PairError::WrongSecret | PairError::Protocol(_))),
            "{name}: {res:?}"
        );
        assert_eq!(book.failures, vec![ticket.id()], "{name}");
        assert!(book.accepted.is_empty(), "{name}");
    }
}

#[tokio::test]
async fn garbage_from_the_desktop_is_an_error_not_a_panic() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let frame = |body: &[u8]| [&(body.len() as u16).to_be_bytes()[..], body].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random message", frame(&[0xa5; 200])),
        ("short message", frame(&[1; 10])),
        ("cut frame", vec![0xff, 0xff, 1, 2, 3]),
    ];
    for (name, bytes) in cases {
        let (mut d, mut p) = pipe();
        d.write_all(&bytes).await.unwrap();
        d.close().await.unwrap();
        let res = initiate_with(
            &mut p,
            &ticket,
            desktop,
            phone,
            &hello(),
            |_: &Welcome| Ok(()),
            TEST_STEP,
        )
        .await;
        assert!(
            matches!(res, Err(PairError::WrongSecret | PairError::Protocol(_))),
            "{name}: {res:?}"
        );
    }
}

#[tokio::test]
async fn silent_phone_times_out() {
    let ticket = ticket_for(peer());
    let mut book = Book::with(&ticket);
    let (mut d, _p) = pipe();
    let res = respond_with(&mut d, peer(), peer(), &mut book, TEST_STEP).await;
    assert!(matches!(res, Err(PairError::Timeout { .. })), "{res:?}");
    assert!(res.unwrap_err().to_string().contains("try again"));

    // Sends the id, then stalls.
    let (mut d, mut p) = pipe();
    write_frame(&mut p, ticket.id().as_bytes(), "id", TEST_STEP)
        .await
        .unwrap();
    let res = respond_with(&mut d, peer(), peer(), &mut book, TEST_STEP).await;
    assert!(
        matches!(res, Err(PairError::Timeout { waiting_for, .. }) if waiting_for == "the phone's hello")
    );
    assert!(book.failures.is_empty());
}

#[tokio::test]
async fn silent_desktop_times_out() {
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let (_d, mut p) = pipe();
    let res = initiate_with(
        &mut p,
        &ticket,
        desktop,
        phone,
        &hello(),
        |_: &Welcome| Ok(()),
        TEST_STEP,
    )
    .await;
    assert!(
        matches!(res, Err(PairError::Timeout { waiting_for, .. }) if waiting_for == "the desktop's welcome"),
        "{res:?}"
    );
}

#[tokio::test]
async fn missing_ack_still_leaves_the_phone_paired_on_the_desktop() {
    // The phone's ack is informative: a phone that stops after the welcome is still trusted.
    let (desktop, phone) = (peer(), peer());
    let ticket = ticket_for(desktop);
    let mut book = Book::with(&ticket);
    let (mut d, mut p) = pipe();
    let hello = serde_json::to_vec(&hello()).unwrap();
    let (res, _) = tokio::join!(
        respond_with(&mut d, desktop, phone, &mut book, TEST_STEP),
        rogue_phone(&mut p, &ticket, desktop, phone, &hello),
    );
    let paired = res.unwrap();
    assert!(
        matches!(paired.ack, PhoneAck::Unconfirmed(PairError::Timeout { .. })),
        "{:?}",
        paired.ack
    );
    assert_eq!(book.accepted.len(), 1);
}

#[test]
fn futures_are_send_so_callers_can_spawn_them() {
    fn assert_send<T: Send>(_: T) {}
    let (mut d, mut p) = pipe();
    let mut book = Book::default();
    let ticket = ticket_for(peer());
    let hello = hello();
    assert_send(respond(&mut d, peer(), peer(), &mut book));
    assert_send(initiate(
        &mut p,
        &ticket,
        peer(),
        peer(),
        &hello,
        |_: &Welcome| Ok(()),
    ));
}

#[test]
fn welcome_debug_hides_the_discovery_secret() {
    let w = Welcome {
        discovery_secret: [0xab; 32],
        ..welcome()
    };
    let dbg = format!("{w:?}");
    assert!(dbg.contains("<redacted>"), "{dbg}");
    assert!(!dbg.to_lowercase().contains("abab"), "{dbg}");
    assert!(!dbg.contains("171"), "{dbg}");
}

#[test]
fn welcome_round_trips_with_a_hex_secret() {
    let json = serde_json::to_value(welcome()).unwrap();
    assert_eq!(json["discovery_secret"], "07".repeat(32));
    assert_eq!(serde_json::from_value::<Welcome>(json).unwrap(), welcome());
    let mut bad = serde_json::to_value(welcome()).unwrap();
    bad["discovery_secret"] = "07".into();
    assert!(serde_json::from_value::<Welcome>(bad).is_err());
}

#[test]
fn prologue_binds_the_protocol_and_both_peers_in_order() {
    let (a, b) = (peer(), peer());
    let p = prologue(&a, &b);
    assert!(p.starts_with(b"/errand/pair/1\0"));
    assert_ne!(p, prologue(&b, &a));
    let a_len = a.to_bytes().len();
    assert_eq!(p.len(), PROLOGUE_TAG.len() + 4 + a_len + b.to_bytes().len());
    assert_eq!(
        &p[PROLOGUE_TAG.len()..PROLOGUE_TAG.len() + 2],
        &(a_len as u16).to_be_bytes()
    );
}

#[test]
fn every_error_tells_a_person_what_to_do() {
    let errors = [
        PairError::WrongDesktop {
            ticket: DeviceId::from_str(&peer().to_base58()).unwrap(),
            connected: peer(),
        },
        PairError::UnknownTicket(TicketId::from_bytes([1; 8])),
        PairError::Refused,
        PairError::WrongSecret,
        PairError::Timeout {
            waiting_for: "the desktop's welcome",
            after: STEP_TIMEOUT,
        },
        PairError::Io(io::ErrorKind::BrokenPipe.into()),
        PairError::Protocol("the hello is not in the expected form".into()),
        PairError::NotSaved("disk full".into()),
    ];
    for e in errors {
        let msg = e.to_string();
        assert!(
            ["errand-desktop pair", "try again", "scan the code"]
                .iter()
                .any(|hint| msg.contains(hint)),
            "{msg}"
        );
    }
}

#[test]
fn clip_cuts_at_a_character_boundary() {
    let long = "é".repeat(MAX_SHORT_TEXT_BYTES);
    let cut = clip(long);
    assert!(cut.len() <= MAX_SHORT_TEXT_BYTES && cut.chars().all(|c| c == 'é'));
    assert_eq!(clip("short".into()), "short");
}
