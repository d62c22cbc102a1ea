//! Linked change chunks: what a packed frame does to the change chunks it carries before
//! they are compressed.
//!
//! A phone back from offline sends its queued tasks as one change each, and each change names
//! the one before it by its SHA-256 hash (32 bytes) and carries a 4-byte checksum taken from
//! that hash. Neither repeats anywhere in the frame, so no compressor can shrink them: they
//! were more than half of the compressed bytes of a 10,000-task catch-up (DEFLATE: 795 KB
//! as they are, 382 KB linked; zstd: 721 and 310 KB). Both can be computed from the chunks
//! themselves, so a packed frame leaves them out:
//!
//! - the checksum of every uncompressed change chunk (type 1) is zeroed, and the receiver
//!   puts back the first four bytes of the chunk's hash;
//! - a dependency on an uncompressed change chunk earlier in the same frame is replaced by a
//!   marker, 28 zero bytes and the big-endian index of that chunk in the frame, and the
//!   receiver puts back that chunk's hash. No SHA-256 hash starts with 28 zero bytes.
//!
//! Nothing changes length, so both directions work in place, and the receiver's result is
//! byte for byte the chunks the sender had. Chunks of other types (documents, bundles,
//! compressed changes) and anything that does not parse as a chunk are left as they are; the
//! ingest checks judge them after this as before.

use sha2::{Digest, Sha256};

/// The magic bytes every Automerge chunk starts with.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// The chunk type of an uncompressed change.
const CHANGE: u8 = 1;
/// The first byte of an Automerge sync message, version 1 and 2.
const SYNC_V1: u8 = 0x42;
const SYNC_V2: u8 = 0x43;
/// Where the checksum sits in a chunk.
const CHECKSUM: std::ops::Range<usize> = 4..8;
/// The zero bytes a dependency marker starts with; its last four bytes are an index.
const MARKER_ZEROS: usize = 28;

/// Why a frame's linked chunks cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// A dependency marker names no uncompressed change chunk before it in the frame.
    #[error(
        "change chunk {chunk} names chunk {target} of the frame as a dependency, which is not an earlier change"
    )]
    BadMarker {
        /// The chunk holding the marker (its index in the frame).
        chunk: usize,
        /// The index the marker names.
        target: u32,
    },
}

/// Where the parts of an uncompressed change chunk are.
struct ChangeHeader {
    /// Offset of the first dependency hash.
    deps: usize,
    /// How many dependency hashes there are.
    deps_count: usize,
    /// The chunk's length in all.
    end: usize,
}

/// Reads one unsigned LEB128 number, returning it and its length in bytes.
fn uleb(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((usize::try_from(value).ok()?, i + 1));
        }
    }
    None
}

/// The length of the chunk at the start of `bytes` and its type, if it is a well-formed
/// chunk header that fits.
fn chunk_extent(bytes: &[u8]) -> Option<(u8, usize, usize)> {
    if bytes.get(..4)? != MAGIC {
        return None;
    }
    let kind = *bytes.get(8)?;
    let (len, n) = uleb(bytes.get(9..)?)?;
    let body = 9 + n;
    let end = body.checked_add(len)?;
    (end <= bytes.len()).then_some((kind, body, end))
}

/// The header of the uncompressed change chunk at the start of `bytes`, if it is one.
fn change_header(bytes: &[u8]) -> Option<ChangeHeader> {
    let (kind, body, end) = chunk_extent(bytes)?;
    if kind != CHANGE {
        return None;
    }
    let (deps_count, n) = uleb(bytes.get(body..end)?)?;
    let deps = body + n;
    let deps_end = deps.checked_add(deps_count.checked_mul(32)?)?;
    (deps_end <= end).then_some(ChangeHeader {
        deps,
        deps_count,
        end,
    })
}

/// A chunk's hash, as Automerge computes it: SHA-256 of everything after the checksum.
fn chunk_hash(chunk: &[u8]) -> [u8; 32] {
    Sha256::digest(&chunk[CHECKSUM.end..]).into()
}

/// Links `chunks` (each one whole chunk, in frame order) in place.
pub fn link<'a>(chunks: impl IntoIterator<Item = &'a mut [u8]>) {
    let mut earlier = std::collections::HashMap::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let Some(h) = change_header(chunk) else {
            continue;
        };
        let chunk = &mut chunk[..h.end];
        let hash = chunk_hash(chunk);
        for d in 0..h.deps_count {
            let dep = &mut chunk[h.deps + 32 * d..h.deps + 32 * (d + 1)];
            if let Some(&index) = earlier.get(&*dep) {
                dep[..MARKER_ZEROS].fill(0);
                dep[MARKER_ZEROS..].copy_from_slice(&u32::to_be_bytes(index));
            }
        }
        chunk[CHECKSUM].fill(0);
        if let Ok(index) = u32::try_from(i) {
            earlier.insert(hash, index);
        }
    }
}

/// Restores chunks that [`link`] linked, in place.
pub fn unlink<'a>(chunks: impl IntoIterator<Item = &'a mut [u8]>) -> Result<(), LinkError> {
    let mut hashes: Vec<Option<[u8; 32]>> = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let Some(h) = change_header(chunk) else {
            hashes.push(None);
            continue;
        };
        let chunk = &mut chunk[..h.end];
        for d in 0..h.deps_count {
            let dep = &mut chunk[h.deps + 32 * d..h.deps + 32 * (d + 1)];
            if dep[..MARKER_ZEROS].iter().any(|&b| b != 0) {
                continue;
            }
            let target = u32::from_be_bytes([dep[28], dep[29], dep[30], dep[31]]);
            let hash = hashes
                .get(target as usize)
                .copied()
                .flatten()
                .ok_or(LinkError::BadMarker { chunk: i, target })?;
            dep.copy_from_slice(&hash);
        }
        let hash = chunk_hash(chunk);
        if chunk[CHECKSUM].iter().all(|&b| b == 0) {
            chunk[CHECKSUM].copy_from_slice(&hash[..4]);
        }
        hashes.push(Some(hash));
    }
    Ok(())
}

/// Splits concatenated chunks (a push's body) into whole chunks. What follows the last
/// well-formed chunk, if anything, is left out.
pub fn split_chunks(mut bytes: &mut [u8]) -> Vec<&mut [u8]> {
    let mut out = Vec::new();
    while let Some((_, _, end)) = chunk_extent(bytes) {
        let (chunk, rest) = bytes.split_at_mut(end);
        out.push(chunk);
        bytes = rest;
    }
    out
}

/// The change chunks of an Automerge sync message, in place: the message is read as its
/// layout is (a type byte; heads, need and each `have`'s last-sync heads as a count and
/// 32-byte hashes; each `have`'s bloom filter and each chunk as a length and bytes), without
/// decoding or encoding anything else. `None` when the bytes do not have that layout (the
/// session's checks then refuse the message as Automerge reads it). Re-encoding a decoded
/// message is not an option for a peer's bytes: Automerge's encoder asserts that hashes are
/// sorted, which a peer's message need not be.
pub fn message_chunks(msg: &mut [u8]) -> Option<Vec<&mut [u8]>> {
    /// Reads a count or a length at `at`, and moves past it.
    fn number(msg: &[u8], at: &mut usize) -> Option<usize> {
        let (n, len) = uleb(msg.get(*at..)?)?;
        *at += len;
        Some(n)
    }
    /// Moves past a count of 32-byte hashes and the hashes.
    fn hashes(msg: &[u8], at: &mut usize) -> Option<()> {
        let n = number(msg, at)?;
        *at = at.checked_add(n.checked_mul(32)?)?;
        Some(())
    }
    if !matches!(msg.first(), Some(&(SYNC_V1 | SYNC_V2))) {
        return None;
    }
    let mut at = 1;
    hashes(msg, &mut at)?; // heads
    hashes(msg, &mut at)?; // need
    for _ in 0..number(msg, &mut at)? {
        hashes(msg, &mut at)?; // last sync
        let bloom = number(msg, &mut at)?;
        at = at.checked_add(bloom)?;
    }
    let mut ranges = Vec::new();
    for _ in 0..number(msg, &mut at)? {
        let len = number(msg, &mut at)?;
        let end = at.checked_add(len)?;
        ranges.push((at, end));
        at = end;
    }
    // What follows (the flags) is Automerge's to read.
    if at > msg.len() {
        return None;
    }
    let mut out = Vec::with_capacity(ranges.len());
    let (mut rest, mut offset) = (msg, 0);
    for (start, end) in ranges {
        let (_, tail) = rest.split_at_mut(start - offset);
        let (chunk, tail) = tail.split_at_mut(end - start);
        out.push(chunk);
        rest = tail;
        offset = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{AutoCommit, ROOT, transaction::Transactable};

    /// `n` one-key changes, each on the one before: their raw chunks, in order.
    fn chain(n: usize) -> Vec<Vec<u8>> {
        let mut doc = AutoCommit::new();
        let mut out = Vec::new();
        for i in 0..n {
            doc.put(ROOT, format!("task{i}"), i as i64).unwrap();
            doc.commit();
            let change = doc.get_last_local_change().unwrap().clone();
            out.push(change.raw_bytes().to_vec());
        }
        out
    }

    #[test]
    fn linking_then_unlinking_gives_the_same_bytes_and_leaves_out_hashes() {
        let original = chain(50);
        let mut chunks = original.clone();
        link(chunks.iter_mut().map(Vec::as_mut_slice));
        assert_ne!(chunks, original);
        for (c, o) in chunks.iter().zip(&original).skip(1) {
            // The dependency on the chunk before is a marker now, and the checksum is zero.
            let h = change_header(o).unwrap();
            assert_eq!(h.deps_count, 1);
            assert_eq!(&c[CHECKSUM], &[0, 0, 0, 0]);
            assert_eq!(&c[h.deps..h.deps + MARKER_ZEROS], &[0u8; MARKER_ZEROS]);
        }
        unlink(chunks.iter_mut().map(Vec::as_mut_slice)).unwrap();
        assert_eq!(chunks, original);

        // The same through a push's concatenated body.
        let mut body: Vec<u8> = original.concat();
        link(split_chunks(&mut body));
        assert_ne!(body, original.concat());
        unlink(split_chunks(&mut body)).unwrap();
        assert_eq!(body, original.concat());
        // And Automerge takes the restored chunks.
        let mut doc = automerge::Automerge::new();
        doc.load_incremental(&body).unwrap();
        assert_eq!(doc.get_changes(&[]).len(), 50);
    }

    #[test]
    fn a_marker_that_names_no_earlier_change_is_an_error() {
        let mut chunks = chain(3);
        link(chunks.iter_mut().map(Vec::as_mut_slice));
        // Chunk 1 names chunk 0; make it name itself, then a chunk past the end.
        let deps = change_header(&chunks[1]).unwrap().deps;
        for target in [1u32, 7, u32::MAX] {
            let mut bad = chunks.clone();
            bad[1][deps + MARKER_ZEROS..deps + 32].copy_from_slice(&target.to_be_bytes());
            assert_eq!(
                unlink(bad.iter_mut().map(Vec::as_mut_slice)),
                Err(LinkError::BadMarker { chunk: 1, target })
            );
        }
        // A marker naming something that is not a change chunk.
        let mut bad = chunks.clone();
        bad[0][0] ^= 1;
        assert_eq!(
            unlink(bad.iter_mut().map(Vec::as_mut_slice)),
            Err(LinkError::BadMarker {
                chunk: 1,
                target: 0
            })
        );
    }

    #[test]
    fn the_chunks_of_a_sync_message_are_found_where_automerge_reads_them() {
        use automerge::sync::{State, SyncDoc};
        let mut doc = AutoCommit::new();
        for i in 0..20 {
            doc.put(ROOT, format!("k{i}"), i).unwrap();
            doc.commit();
        }
        // A message with a `have` (last-sync heads and a bloom filter) and no changes, then
        // one that carries changes.
        let mut ours = State::new();
        let first = doc.sync().generate_sync_message(&mut ours).unwrap();
        let mut peer = AutoCommit::new();
        peer.put(ROOT, "theirs", 1).unwrap();
        peer.commit();
        let mut theirs = State::new();
        peer.sync()
            .receive_sync_message(&mut theirs, first)
            .unwrap();
        let reply = peer.sync().generate_sync_message(&mut theirs).unwrap();
        // What `message_chunks` finds in a message's bytes is what Automerge decodes.
        let same_chunks = |m: &automerge::sync::Message| {
            let mut bytes = m.clone().encode();
            let found: Vec<Vec<u8>> = message_chunks(&mut bytes)
                .unwrap()
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            let automerge: Vec<Vec<u8>> = m.changes.iter().map(<[u8]>::to_vec).collect();
            assert_eq!(found, automerge);
            bytes
        };
        assert!(!reply.have.is_empty());
        same_chunks(&reply);
        doc.sync().receive_sync_message(&mut ours, reply).unwrap();
        let with_changes = doc.sync().generate_sync_message(&mut ours).unwrap();
        assert!(!with_changes.changes.is_empty());
        let bytes = same_chunks(&with_changes);
        // Every cut of it is refused or read without a panic, and never past its end.
        for cut in 0..bytes.len() {
            let mut short = bytes[..cut].to_vec();
            let _ = message_chunks(&mut short);
        }
        assert!(message_chunks(&mut [0x41, 0, 0, 0, 0]).is_none());
        assert!(message_chunks(&mut [0x42, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_none());
    }

    #[test]
    fn garbage_is_left_as_it_is() {
        let mut junk: Vec<Vec<u8>> = vec![
            vec![],
            MAGIC.to_vec(),
            [
                &MAGIC[..],
                &[0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ]
            .concat(),
            [&MAGIC[..], &[0, 0, 0, 0, 1, 3, 0xff, 0xff, 0xff]].concat(),
            vec![7; 40],
        ];
        let before = junk.clone();
        link(junk.iter_mut().map(Vec::as_mut_slice));
        unlink(junk.iter_mut().map(Vec::as_mut_slice)).unwrap();
        assert_eq!(junk, before);
        let mut body = before.concat();
        link(split_chunks(&mut body));
        unlink(split_chunks(&mut body)).unwrap();
        assert_eq!(body, before.concat());
    }
}
