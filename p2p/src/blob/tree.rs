//! Verifying a blob piece by piece against its BLAKE3 hash. Pure: no I/O.
//!
//! BLAKE3 is a Merkle tree over 1 KiB chunks. This module cuts it at *groups* of
//! [`GROUP`] bytes (16 chunks, aligned), as bao-tree's chunk groups do:
//!
//! - The *outboard* of a blob is the chaining value of each group, in order: 32 bytes per
//!   16 KiB (0.2 % of the blob). A blob of one group or less has an empty outboard; its one
//!   group is checked against the hash directly.
//! - A receiver first gets the outboard and checks it against the hash by rebuilding the
//!   tree's root from it ([`root_from_outboard`]). From then on every group that arrives is
//!   checked against its chaining value ([`Verifier::check_group`]) before it is written, so a
//!   bad byte is refused at once and only its group is fetched again.
//! - Groups are aligned subtrees of the BLAKE3 tree (the tree splits at the largest power of
//!   two chunks below a node's length, which for a node longer than a group is a multiple of
//!   it), so their chaining values are what BLAKE3 itself computes: the hash is the ordinary
//!   `blake3::hash` of the file.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

/// Bytes per group: 16 BLAKE3 chunks. Verification, requests and resumption all work in
/// whole groups; 16 KiB keeps the outboard small and a bad group cheap to fetch again.
pub const GROUP: u64 = 16 * 1024;

/// Bytes of one chaining value in the outboard.
pub const CV_LEN: u64 = 32;

/// Length of a blob's outboard: one chaining value per group, none for a single group.
pub fn outboard_len(size: u64) -> u64 {
    if size <= GROUP {
        0
    } else {
        size.div_ceil(GROUP) * CV_LEN
    }
}

/// Number of groups of a blob (an empty blob has one empty group).
pub fn groups(size: u64) -> u64 {
    size.div_ceil(GROUP).max(1)
}

/// Length of group `index` of a blob of `size` bytes.
pub fn group_len(size: u64, index: u64) -> u64 {
    size.saturating_sub(index * GROUP).min(GROUP)
}

/// The chaining value of group `index` (not the root: only for blobs of more than one group).
pub fn group_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * GROUP);
    h.update(data);
    h.finalize_non_root()
}

/// Builds the outboard while the blob is read once, front to back.
#[derive(Debug, Default)]
pub struct OutboardBuilder {
    hasher: blake3::Hasher,
    cvs: Vec<u8>,
    group: Vec<u8>,
    size: u64,
}

impl OutboardBuilder {
    /// A builder for a new blob.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (GROUP as usize - self.group.len()).min(data.len());
            self.group.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.group.len() == GROUP as usize {
                self.flush_group();
            }
        }
    }

    fn flush_group(&mut self) {
        let index = self.cvs.len() as u64 / CV_LEN;
        self.cvs.extend_from_slice(&group_cv(index, &self.group));
        self.group.clear();
    }

    /// The blob's hash, size and outboard.
    pub fn finish(mut self) -> (blake3::Hash, u64, Vec<u8>) {
        if !self.group.is_empty() {
            self.flush_group();
        }
        let out = if self.size <= GROUP {
            Vec::new()
        } else {
            self.cvs
        };
        (self.hasher.finalize(), self.size, out)
    }
}

fn cv_at(outboard: &[u8], index: u64) -> Option<ChainingValue> {
    let start = usize::try_from(index * CV_LEN).ok()?;
    outboard
        .get(start..start + CV_LEN as usize)?
        .try_into()
        .ok()
}

/// The chaining value of the subtree over groups from `first`, `len` bytes long.
fn subtree(outboard: &[u8], first: u64, len: u64) -> Option<ChainingValue> {
    if len <= GROUP {
        return cv_at(outboard, first);
    }
    let left = left_subtree_len(len);
    let l = subtree(outboard, first, left)?;
    let r = subtree(outboard, first + left / GROUP, len - left)?;
    Some(merge_subtrees_non_root(&l, &r, Mode::Hash))
}

/// The root hash that an outboard for a blob of `size` bytes implies; `None` when the
/// outboard has the wrong length or the blob is a single group (no outboard to check).
pub fn root_from_outboard(outboard: &[u8], size: u64) -> Option<blake3::Hash> {
    if size <= GROUP || outboard.len() as u64 != outboard_len(size) {
        return None;
    }
    let left = left_subtree_len(size);
    let l = subtree(outboard, 0, left)?;
    let r = subtree(outboard, left / GROUP, size - left)?;
    Some(merge_subtrees_root(&l, &r, Mode::Hash))
}

/// Why a piece was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The outboard does not lead to the blob's hash.
    #[error("the outboard does not match the blob's hash")]
    Outboard,
    /// A group's bytes do not match its chaining value (or the hash).
    #[error("group {0} does not match the blob's hash")]
    Group(u64),
    /// A group has the wrong length.
    #[error("group {index} is {got} bytes, expected {expected}")]
    Length {
        /// Which group.
        index: u64,
        /// Its length.
        got: u64,
        /// The length it must have.
        expected: u64,
    },
}

/// Checks the groups of one blob against its hash, once the outboard is known good.
#[derive(Debug, Clone)]
pub struct Verifier {
    root: blake3::Hash,
    size: u64,
    outboard: Vec<u8>,
}

impl Verifier {
    /// A verifier from the blob's hash, size and outboard; refuses an outboard that does not
    /// lead to the hash.
    pub fn new(root: [u8; 32], size: u64, outboard: Vec<u8>) -> Result<Self, VerifyError> {
        let root = blake3::Hash::from_bytes(root);
        if size > GROUP && root_from_outboard(&outboard, size) != Some(root) {
            return Err(VerifyError::Outboard);
        }
        if size <= GROUP && !outboard.is_empty() {
            return Err(VerifyError::Outboard);
        }
        Ok(Self {
            root,
            size,
            outboard,
        })
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The verified outboard.
    pub fn outboard(&self) -> &[u8] {
        &self.outboard
    }

    /// Checks group `index`.
    pub fn check_group(&self, index: u64, data: &[u8]) -> Result<(), VerifyError> {
        let expected = group_len(self.size, index);
        if data.len() as u64 != expected || index >= groups(self.size) {
            return Err(VerifyError::Length {
                index,
                got: data.len() as u64,
                expected,
            });
        }
        let ok = if self.size <= GROUP {
            blake3::hash(data) == self.root
        } else {
            cv_at(&self.outboard, index) == Some(group_cv(index, data))
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::Group(index))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 7) as u8).collect()
    }

    #[test]
    fn outboards_lead_to_the_ordinary_blake3_hash_at_every_size() {
        for n in [
            0,
            1,
            1024,
            GROUP as usize,
            GROUP as usize + 1,
            2 * GROUP as usize,
            3 * GROUP as usize - 5,
            5 * GROUP as usize,
            17 * GROUP as usize + 999,
            64 * GROUP as usize,
        ] {
            let d = data(n);
            let mut b = OutboardBuilder::new();
            // Fed in odd pieces, as a file is read.
            for piece in d.chunks(7777) {
                b.update(piece);
            }
            let (hash, size, outboard) = b.finish();
            assert_eq!(hash, blake3::hash(&d), "{n}");
            assert_eq!(size, n as u64);
            assert_eq!(outboard.len() as u64, outboard_len(size));
            let v = Verifier::new(*hash.as_bytes(), size, outboard).unwrap();
            for (i, g) in d.chunks(GROUP as usize).enumerate() {
                v.check_group(i as u64, g).unwrap();
            }
            if n == 0 {
                v.check_group(0, &[]).unwrap();
            }
        }
    }

    #[test]
    fn a_flipped_bit_in_a_group_or_the_outboard_is_refused() {
        let d = data(5 * GROUP as usize + 100);
        let mut b = OutboardBuilder::new();
        b.update(&d);
        let (hash, size, outboard) = b.finish();
        let mut bad = outboard.clone();
        bad[40] ^= 1;
        assert_eq!(
            Verifier::new(*hash.as_bytes(), size, bad).unwrap_err(),
            VerifyError::Outboard
        );
        let v = Verifier::new(*hash.as_bytes(), size, outboard).unwrap();
        let mut g = d[GROUP as usize..2 * GROUP as usize].to_vec();
        g[100] ^= 0x10;
        assert_eq!(v.check_group(1, &g), Err(VerifyError::Group(1)));
        // The right bytes in the wrong place are refused too.
        assert_eq!(
            v.check_group(2, &d[GROUP as usize..2 * GROUP as usize]),
            Err(VerifyError::Group(2))
        );
        assert!(matches!(
            v.check_group(5, &d[..10]),
            Err(VerifyError::Length { .. })
        ));
        assert!(matches!(
            v.check_group(6, &[]),
            Err(VerifyError::Length { .. })
        ));
    }

    #[test]
    fn a_small_blob_is_checked_against_its_hash_directly() {
        let d = data(500);
        let v = Verifier::new(*blake3::hash(&d).as_bytes(), 500, Vec::new()).unwrap();
        v.check_group(0, &d).unwrap();
        let mut bad = d.clone();
        bad[0] ^= 1;
        assert_eq!(v.check_group(0, &bad), Err(VerifyError::Group(0)));
    }
}
