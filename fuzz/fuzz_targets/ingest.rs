//! A peer's bytes into the ingest check, as the owner desktop sees a phone: a sync message and
//! pushed changes. No panic escapes; a refusal is an error value; what passes is within the
//! bounds and written only by the actor the phone is bound to.
#![no_main]

use std::collections::BTreeSet;

use automerge::{ActorId, Automerge};
use errand_crdt::ingest::{Authority, Bounds, check_pushed, check_sync_message};
use libfuzzer_sys::fuzz_target;

/// The phone's actor in the seeds (`seeds/ingest` were written by this actor).
const PHONE_ACTOR: [u8; 16] = [7; 16];

fuzz_target!(
    init: {
        // Automerge panics on some malformed chunks; the ingest check catches that and refuses
        // the bytes (`IngestError::Malformed`). libfuzzer-sys's hook would abort at the panic
        // itself, before the check can catch it: a panic that escapes the check still aborts,
        // in libfuzzer-sys's own `catch_unwind`.
        std::panic::set_hook(Box::new(|info| {
            // This target's own assertions, which do abort, say what broke.
            if info.location().is_some_and(|l| l.file().contains("fuzz_targets")) {
                eprintln!("{info}");
            }
        }));
    },
    |data: &[u8]| {
    let doc = Automerge::new();
    let phone = ActorId::from(PHONE_ACTOR);
    let authority = Authority {
        actors: BTreeSet::from([phone.clone()]),
        all_but: None,
    };
    for checked in [
        check_sync_message(data, &doc, &authority, Bounds::PHONE),
        check_pushed(data, &doc, &authority, Bounds::PHONE),
    ]
    .into_iter()
    .flatten()
    {
        for change in &checked.changes {
            assert_eq!(change.actor_id(), &phone, "a foreign actor passed");
            if let Some(max) = Bounds::PHONE.max_ops_per_change {
                assert!(change.len() <= max, "a change of {} ops passed", change.len());
            }
        }
        assert!(!checked.document, "a whole document passed on the phone's bounds");
    }
});
