//! A phone back from offline with N queued tasks catches up with its desktop: two engines
//! over real redb files in one process, joined by [`errand_crdt::engine::loopback`]. Prints
//! the time each side spent and the bytes exchanged. For profiling the engine alone:
//!
//! ```text
//! cargo run --release -p errand-crdt --example catch_up -- 10000
//! ```

use std::time::Instant;

use errand_core::{DeviceId, DeviceKind, ThreadId};
use errand_crdt::{
    NewTask, Store, ThreadGenesis,
    engine::{Binding, Engine, EngineConfig, loopback},
};

fn device(seed: u8) -> DeviceId {
    let mut b = vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20];
    b.extend(std::iter::repeat_n(seed, 32));
    DeviceId::from_bytes(&b).expect("a well-formed device id")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|_| format!("not a task count: {a}"))?,
        None => 10_000,
    };
    let dir = tempfile::tempdir()?;
    let config = EngineConfig {
        ops_per_minute: u64::MAX / 2,
        segment_limit: None,
    };
    let (desktop_id, phone_id) = (device(1), device(2));
    let mut desktop = Engine::open(Store::open(&dir.path().join("desktop"))?, config)?;
    let mut phone = Engine::open(Store::open(&dir.path().join("phone"))?, config)?;
    let genesis = desktop.create_thread(ThreadGenesis {
        thread_id: ThreadId::new_at(1_700_000_000_000),
        owner: desktop_id.clone(),
        owner_actor: desktop.actor().to_hex_string(),
    })?;
    desktop.ensure_device(
        phone_id.clone(),
        "phone".into(),
        DeviceKind::Phone,
        phone.actor().to_hex_string(),
        Binding::Pairing,
        1,
    )?;
    phone.adopt(genesis)?;
    loopback::sync(&mut phone, &phone_id, &mut desktop, &desktop_id)?;
    let t = Instant::now();
    for i in 0..n {
        phone.commit(|d| {
            d.enqueue_task(
                &NewTask {
                    instruction: format!("offline task {i}: summarise the notes in ~/inbox"),
                    executor: "shell".into(),
                    target: desktop_id.clone(),
                    not_after: None,
                    attachments: Vec::new(),
                },
                1_700_000_000_000 + i as i64,
            )
        })?;
    }
    eprintln!("queued {n} tasks on the phone in {:?}", t.elapsed());
    let t = Instant::now();
    let x = loopback::sync(&mut phone, &phone_id, &mut desktop, &desktop_id)?;
    println!(
        "catch-up of {n} tasks: {:.1} ms (phone {:.1} ms, desktop {:.1} ms), {} frames, {} bytes; desktop holds {} open tasks",
        t.elapsed().as_secs_f64() * 1e3,
        x.a_time.as_secs_f64() * 1e3,
        x.b_time.as_secs_f64() * 1e3,
        x.frames,
        x.bytes,
        desktop.open_tasks().len()
    );
    Ok(())
}
