//! A `session/update` from an agent, as the SDK decodes it and the desktop maps it: no panic,
//! and what is kept stays within the bounds of the line it came in.
#![no_main]

use agent_client_protocol::v1::schema::SessionNotification;
use errand_desktop::acp::{AgentEvent, from_update};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(notification) = serde_json::from_slice::<SessionNotification>(data) else {
        return;
    };
    let Some(event) = from_update(notification.update) else {
        return;
    };
    let kept = match &event {
        AgentEvent::Text(t) => t.len(),
        AgentEvent::ToolCall {
            id,
            title,
            kind,
            status,
        } => id.len() + title.len() + kind.len() + status.len(),
        AgentEvent::Plan(entries) => entries
            .iter()
            .map(|e| e.content.len() + e.status.len())
            .sum(),
        _ => 0,
    };
    assert!(
        kept <= data.len(),
        "{kept} bytes kept from a {}-byte line",
        data.len()
    );
});
