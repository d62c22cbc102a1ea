//! Printing a response: `--json` prints the record as it is; otherwise each response type
//! shows itself as text ([`Show`]), with text from the thread passed through [`printable`].

use std::io::Write;

use errand_core::DeviceKind;
use serde::Serialize;

use super::Opened;
use crate::{
    api::{
        Answered, Call, DeviceAdded, DeviceInfo, Forgotten, Paired, Replied, Requested, Revoked,
        Sent, StatusInfo, TaskInfo, ThreadInfo,
    },
    control::ApiError,
};

/// A response as text, for a person.
pub trait Show {
    /// Prints it on stdout. `cli` is the kind of device whose CLI prints (a phone lists its
    /// devices more briefly).
    fn show(&self, cli: DeviceKind);
}

/// Runs `call` and prints its response: as JSON with `json`, else as text.
pub async fn show<C>(opened: &Opened, call: C, json: bool, cli: DeviceKind) -> Result<(), ApiError>
where
    C: Call,
    C::Response: Show,
{
    let response = opened.call(call).await?;
    if json {
        print_json(&response);
    } else {
        response.show(cli);
    }
    Ok(())
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(v: &impl Serialize) {
    // A closed pipe (`… --json | head`) is not an error worth a panic.
    let _ = writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    );
}

impl Show for StatusInfo {
    fn show(&self, _: DeviceKind) {
        let s = |x: Option<&str>| printable(x.unwrap_or("-"), false);
        println!("peer id:   {}", s(Some(&self.peer_id)));
        println!("name:      {}", s(Some(&self.name)));
        println!("thread:    {}", s(self.thread_id.as_deref()));
        println!(
            "running:   {}",
            if self.running {
                "yes"
            } else {
                "no (no daemon holds this home)"
            }
        );
        for a in &self.listen_addrs {
            println!("listening: {a}");
        }
        if self.peers.is_empty() {
            println!("peers:     none trusted yet");
        }
        for p in &self.peers {
            println!(
                "peer:      {} {} ({}) {}{} last sync {}",
                s(Some(&p.id)),
                s(Some(&p.name)),
                p.kind.as_str(),
                if p.connected {
                    s(p.path.map(|path| path.as_str()))
                } else {
                    "offline".into()
                },
                if p.in_sync { ", in sync" } else { "" },
                s(p.last_sync_at.as_deref()),
            );
        }
    }
}

/// One line for a task: id, status, its instruction's first line, and pending requests.
pub fn task_line(t: &TaskInfo) -> String {
    let requests: Vec<&str> = t
        .requests
        .iter()
        .map(|r| match r {
            errand_core::Request::CancelRequested => "cancel requested",
            errand_core::Request::Approved => "approved",
            errand_core::Request::Denied => "denied",
        })
        .collect();
    format!(
        "{}  {:<19} {}{}",
        t.id,
        t.status.label(),
        printable(t.instruction.lines().next().unwrap_or(""), false),
        if requests.is_empty() {
            String::new()
        } else {
            format!("  [{}]", requests.join(", "))
        }
    )
}

impl Show for TaskInfo {
    fn show(&self, _: DeviceKind) {
        println!("{}", task_line(self));
        // A conversation (an agent's task, or any task with a reply) shows each turn; a plain
        // task shows its output as before.
        if self.conversation.len() > 2 {
            for line in &self.conversation {
                let who = match line.role {
                    errand_core::Role::User => "you",
                    errand_core::Role::Agent => "agent",
                };
                println!("--- {who}, {}", line.at);
                print_text(&line.text);
                if !line.text.ends_with('\n') {
                    println!();
                }
            }
        } else {
            print_text(&self.output_tail);
        }
        if !self.plan.is_empty() {
            println!("plan:");
            for e in &self.plan {
                println!(
                    "  [{}] {}",
                    printable(&e.status, false),
                    printable(&e.content, false)
                );
            }
        }
        for c in &self.tool_calls {
            println!(
                "tool call: {} ({}) {}",
                printable(&c.title, false),
                printable(&c.kind, false),
                printable(&c.status, false)
            );
        }
        if let Some(p) = &self.permission {
            println!(
                "permission asked: {} ({})",
                printable(&p.title, false),
                printable(&p.kind, false)
            );
            for o in &p.options {
                println!(
                    "  {}  {} [{}]",
                    printable(&o.id, false),
                    printable(&o.name, false),
                    printable(&o.kind, false)
                );
            }
            println!(
                "answer with: errand-phone answer {} OPTION (or allow / deny)",
                self.id
            );
        }
    }
}

impl Show for Replied {
    /// Nothing: the exit code says it was stored.
    fn show(&self, _: DeviceKind) {}
}

impl Show for Answered {
    fn show(&self, _: DeviceKind) {
        println!("answered {}", printable(&self.option, false));
    }
}

impl Show for ThreadInfo {
    fn show(&self, _: DeviceKind) {
        for t in &self.tasks {
            println!("{}", task_line(t));
        }
    }
}

impl Show for Sent {
    fn show(&self, _: DeviceKind) {
        println!("{}", self.task_id);
    }
}

impl Show for Requested {
    /// Nothing: the exit code says it was appended.
    fn show(&self, _: DeviceKind) {}
}

impl Show for Vec<DeviceInfo> {
    fn show(&self, cli: DeviceKind) {
        for d in self {
            let name = printable(&d.name, false);
            match cli {
                DeviceKind::Phone => println!("{}  {name}", d.id),
                DeviceKind::Desktop => println!(
                    "{}  {name} ({}) paired {} last seen {}{}",
                    d.id,
                    d.kind.as_str(),
                    printable(&d.paired_at, false),
                    printable(d.last_seen.as_deref().unwrap_or("-"), false),
                    if d.revoked { "  REVOKED" } else { "" }
                ),
            }
        }
    }
}

impl Show for DeviceAdded {
    fn show(&self, _: DeviceKind) {
        println!("trusted {}", self.id);
    }
}

impl Show for Revoked {
    fn show(&self, _: DeviceKind) {
        println!(
            "revoked {}; cancelled {} unstarted task(s)",
            printable(&self.id, false),
            self.cancelled_tasks
        );
    }
}

impl Show for Forgotten {
    fn show(&self, _: DeviceKind) {
        for id in &self.forgotten {
            println!("forgot {}", printable(id, false));
        }
    }
}

impl Show for Paired {
    fn show(&self, _: DeviceKind) {
        println!(
            "paired with {} ({})",
            printable(&self.desktop_name, false),
            printable(&self.desktop_id, false)
        );
    }
}

/// Text from the thread (instructions, task output, device names) made safe for a terminal:
/// escape sequences (CSI, OSC and the other ESC forms, and their 8-bit C1 twins) and every other
/// control character are dropped, and so are the bidirectional overrides that reorder what a
/// reader sees. With `multiline`, newline and tab stay. JSON output never goes through this:
/// serde escapes control characters, and a script gets the exact text.
pub fn printable(text: &str, multiline: bool) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(end) = escape_end(&chars, i) {
            i = end;
            continue;
        }
        let keep = match c {
            '\n' | '\t' => multiline,
            c if c.is_control() => false,
            c => !is_bidi_control(c),
        };
        if keep {
            out.push(c);
        }
        i += 1;
    }
    out
}

/// If an escape sequence starts at `i`, the index just past it. An unterminated string
/// sequence (OSC and kin) counts as its introducer only, so the text after it stays visible.
fn escape_end(chars: &[char], i: usize) -> Option<usize> {
    const ESC: char = '\u{1b}';
    const BEL: char = '\u{7}';
    let (kind, body) = match (chars[i], chars.get(i + 1).copied()) {
        (ESC, Some('[')) | ('\u{9b}', _) => {
            (Escape::Csi, if chars[i] == ESC { i + 2 } else { i + 1 })
        }
        (ESC, Some(']' | 'P' | 'X' | '^' | '_')) => (Escape::String, i + 2),
        ('\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}', _) => (Escape::String, i + 1),
        (ESC, Some(c)) if (' '..='/').contains(&c) || ('0'..='~').contains(&c) => {
            (Escape::Short, i + 1)
        }
        _ => return None,
    };
    match kind {
        // Parameters and intermediates, then one final byte.
        Escape::Csi => {
            let mut j = body;
            while let Some(&c) = chars.get(j) {
                j += 1;
                if ('@'..='~').contains(&c) {
                    return Some(j);
                }
                if !(' '..='?').contains(&c) {
                    // Not a CSI byte: the sequence ends before it.
                    return Some(j - 1);
                }
            }
            Some(j)
        }
        // Up to BEL, ESC \ or 8-bit ST.
        Escape::String => {
            let mut j = body;
            while let Some(&c) = chars.get(j) {
                match c {
                    BEL | '\u{9c}' => return Some(j + 1),
                    ESC if chars.get(j + 1) == Some(&'\\') => return Some(j + 2),
                    _ => j += 1,
                }
            }
            Some(body)
        }
        // Intermediates, then one final byte.
        Escape::Short => {
            let mut j = body;
            while let Some(&c) = chars.get(j) {
                j += 1;
                if !(' '..='/').contains(&c) {
                    return Some(j);
                }
            }
            Some(j)
        }
    }
}

#[derive(Clone, Copy)]
enum Escape {
    Csi,
    String,
    Short,
}

/// Unicode's bidirectional formatting characters (embeddings, overrides, isolates, marks).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Prints a task's output (or any multi-line text from the thread) as [`printable`] text.
pub fn print_text(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(printable(text, true).as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escape_sequences_and_controls_are_dropped() {
        let cases = [
            ("\u{1b}[31mred\u{1b}[0m", "red"),
            ("\u{1b}[?1049h\u{1b}[2J\u{1b}[Hclear", "clear"),
            ("a\u{1b}]0;title\u{7}b", "ab"),
            (
                "a\u{1b}]8;;http://x\u{1b}\\link\u{1b}]8;;\u{1b}\\b",
                "alinkb",
            ),
            ("a\u{1b}Pdcs\u{1b}\\b", "ab"),
            ("a\u{1b}(Bb\u{1b}7c\u{1b}Md", "abcd"),
            ("a\u{9b}31mb\u{9d}0;t\u{9c}c", "abc"),
            ("bell\u{7} back\u{8}space\r", "bell backspace"),
            ("a\u{202e}cba\u{2066}d\u{200f}", "acbad"),
            (
                "unterminated \u{1b}]0;still shown",
                "unterminated 0;still shown",
            ),
            ("trailing \u{1b}", "trailing "),
            ("ünïcödé ✓", "ünïcödé ✓"),
        ];
        for (input, want) in cases {
            assert_eq!(printable(input, false), want, "{input:?}");
        }
    }

    #[test]
    fn newline_and_tab_stay_only_in_multi_line_text() {
        assert_eq!(printable("a\tb\r\nc\n", true), "a\tb\nc\n");
        assert_eq!(printable("a\tb\r\nc\n", false), "abc");
    }
}
