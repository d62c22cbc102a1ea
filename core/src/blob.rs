//! Files as the thread names them: a BLAKE3 hash, a name, a size and a media type.
//!
//! - Files never enter the document. A task's `attachments` (written by the phone with the
//!   task) and a desktop's `artifact` facts hold a [`BlobRef`]; the bytes travel over
//!   `/errand/blob/1` and are verified against [`BlobHash`] as they arrive.
//! - A name comes from another device, so it is never used as a path as it stands:
//!   [`safe_file_name`] turns any string into one plain file name; a writer writes only
//!   names that are already one ([`is_safe_file_name`]), and a reader reads any other name
//!   as the plain name it ends in (`../../x` is `x`).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Most attachments one task may carry. 32 covers "these photos and that log" while keeping
/// a task's change small (each reference is about 200 bytes).
pub const MAX_ATTACHMENTS: usize = 32;

/// Most `artifact` facts counted per attempt. A task that writes thousands of files should
/// archive them; 64 references stay well inside a change.
pub const MAX_ARTIFACTS_PER_ATTEMPT: usize = 64;

/// Longest file name, in bytes: the common file-system limit (ext4, APFS, NTFS in UTF-16
/// units is larger, so 255 bytes fits everywhere).
pub const MAX_FILE_NAME_BYTES: usize = 255;

/// Longest media type, in bytes (RFC 6838 allows 127 characters on each side of the slash;
/// real ones are far shorter).
pub const MAX_MIME_BYTES: usize = 127;

/// Why a blob hash did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a blob hash (expected 64 lowercase hex characters): {0:?}")]
pub struct HashError(pub String);

/// A BLAKE3 hash naming a blob: 32 bytes, written as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BlobHash([u8; 32]);

impl BlobHash {
    /// The hash from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({self})")
    }
}

impl FromStr for BlobHash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        let err = || HashError(s.chars().take(80).collect());
        if s.len() != 64 {
            return Err(err());
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
            let (hi, lo) = (
                digit(pair[0]).ok_or_else(err)?,
                digit(pair[1]).ok_or_else(err)?,
            );
            out[i] = (hi << 4) | lo;
        }
        Ok(Self(out))
    }
}

impl TryFrom<String> for BlobHash {
    type Error = HashError;
    fn try_from(s: String) -> Result<Self, HashError> {
        s.parse()
    }
}

impl From<BlobHash> for String {
    fn from(h: BlobHash) -> String {
        h.to_string()
    }
}

/// A file as the thread names it: an attachment of a task, or an artifact of an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// The BLAKE3 hash of its bytes.
    pub hash: BlobHash,
    /// Its file name: one plain name ([`is_safe_file_name`]), never a path.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its media type (`application/octet-stream` when unknown).
    pub mime: String,
}

/// Why a [`BlobRef`] may not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobRefError {
    /// The name is not one plain file name.
    #[error("file name {0:?} is not a plain file name (use safe_file_name)")]
    UnsafeName(String),
    /// The media type is empty, too long, or has control characters.
    #[error("media type {0:?} is not valid")]
    Mime(String),
}

impl BlobRef {
    /// Checks what a reader checks, so a writer never writes what readers skip.
    pub fn check(&self) -> Result<(), BlobRefError> {
        if !is_safe_file_name(&self.name) {
            return Err(BlobRefError::UnsafeName(self.name.clone()));
        }
        if !is_valid_mime(&self.mime) {
            return Err(BlobRefError::Mime(self.mime.clone()));
        }
        Ok(())
    }
}

/// True for a media type a reader keeps: non-empty, at most [`MAX_MIME_BYTES`], printable
/// ASCII.
pub fn is_valid_mime(mime: &str) -> bool {
    !mime.is_empty()
        && mime.len() <= MAX_MIME_BYTES
        && mime.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// The media type of a file by its name's extension; `application/octet-stream` when it is
/// not one of the common ones. Only a label for the phone's screen: nothing runs by it.
pub fn mime_for_name(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("txt" | "log") => "text/plain",
        Some("md") => "text/markdown",
        Some("csv") => "text/csv",
        Some("html" | "htm") => "text/html",
        Some("json") => "application/json",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        Some("gz" | "tgz") => "application/gzip",
        Some("tar") => "application/x-tar",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("heic") => "image/heic",
        Some("svg") => "image/svg+xml",
        Some("mp3") => "audio/mpeg",
        Some("m4a") => "audio/mp4",
        Some("wav") => "audio/wav",
        Some("mp4") => "video/mp4",
        Some("mov") => "video/quicktime",
        _ => "application/octet-stream",
    }
}

/// Windows device names: a file named `CON` or `nul.txt` opens the device, not a file.
const DEVICE_NAMES: [&str; 22] = [
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// Characters that are never kept in a name: separators on any system, and those Windows
/// refuses.
fn is_forbidden(c: char) -> bool {
    c.is_control() || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')
}

/// One plain file name made from any string, the same on every system. Pure.
///
/// - Only the last component of a path counts (`../../x` → `x`, `C:\a\b.txt` → `b.txt`), as
///   a browser does with a download.
/// - Control characters and the characters Windows refuses (`: * ? " < > |`) become `_`.
/// - Trailing dots and spaces go (Windows drops them silently); so do leading spaces.
/// - A Windows device name (`CON`, `nul.txt`, `COM1`…) gets a leading `_`.
/// - Empty, `.` or `..` becomes `file`.
/// - At most [`MAX_FILE_NAME_BYTES`], cut at a character boundary, keeping the extension
///   when it is short.
pub fn safe_file_name(name: &str) -> String {
    let last = name
        .rsplit(['/', '\\'])
        .find(|c| !c.trim().is_empty() && *c != "." && *c != "..")
        .unwrap_or("");
    let mut out: String = last
        .chars()
        .map(|c| if is_forbidden(c) { '_' } else { c })
        .collect();
    let trimmed = out.trim_start_matches(' ').trim_end_matches(['.', ' ']);
    out = trimmed.to_string();
    if out.is_empty() || out == "." || out == ".." {
        out = "file".to_string();
    }
    let stem = out.split('.').next().unwrap_or("").trim_end();
    if DEVICE_NAMES.iter().any(|d| d.eq_ignore_ascii_case(stem)) {
        out.insert(0, '_');
    }
    if out.len() > MAX_FILE_NAME_BYTES {
        out = shorten(&out);
    }
    out
}

/// Cuts a name to [`MAX_FILE_NAME_BYTES`], keeping an extension of up to 16 bytes.
fn shorten(name: &str) -> String {
    let ext = match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= 16 => &name[i..],
        _ => "",
    };
    let mut cut = MAX_FILE_NAME_BYTES - ext.len();
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let stem = name[..cut].trim_end_matches(['.', ' ']);
    format!("{stem}{ext}")
}

/// True when `name` is already one plain file name: [`safe_file_name`] leaves it as it is.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_FILE_NAME_BYTES && safe_file_name(name) == name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trips_through_hex_and_refuses_anything_else() {
        let h = BlobHash::from_bytes([0xab; 32]);
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<BlobHash>(), Ok(h));
        assert!(s.to_uppercase().parse::<BlobHash>().is_err());
        assert!(s[..63].parse::<BlobHash>().is_err());
        assert!(format!("{s}0").parse::<BlobHash>().is_err());
        assert!(format!("g{}", &s[1..]).parse::<BlobHash>().is_err());
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<BlobHash>(&json).unwrap(), h);
    }

    #[test]
    fn path_components_are_dropped_and_only_the_last_name_is_kept() {
        assert_eq!(safe_file_name("../../x"), "x");
        assert_eq!(safe_file_name("/etc/passwd"), "passwd");
        assert_eq!(safe_file_name("C:\\Users\\a\\b.txt"), "b.txt");
        assert_eq!(safe_file_name("a/b/.."), "b");
        assert_eq!(safe_file_name("report.pdf"), "report.pdf");
    }

    #[test]
    fn dot_names_and_empty_names_become_file() {
        for n in ["", ".", "..", "../..", "/", "\\\\", "   ", "...", " . "] {
            assert_eq!(safe_file_name(n), "file", "{n:?}");
        }
    }

    #[test]
    fn control_and_windows_reserved_characters_are_replaced() {
        assert_eq!(safe_file_name("a\0b"), "a_b");
        assert_eq!(safe_file_name("a\nb\tc"), "a_b_c");
        assert_eq!(safe_file_name("what?.txt"), "what_.txt");
        assert_eq!(safe_file_name("c:x"), "c_x");
        assert_eq!(safe_file_name("name. . "), "name");
    }

    #[test]
    fn windows_device_names_get_a_prefix() {
        for n in ["CON", "con", "nul.txt", "COM1", "lpt9.tar.gz", "Aux"] {
            let s = safe_file_name(n);
            assert!(s.starts_with('_'), "{n:?} → {s:?}");
        }
        assert_eq!(safe_file_name("console.log"), "console.log");
        assert_eq!(safe_file_name("COM10"), "COM10");
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary_keeping_the_extension() {
        let long = format!("{}.jpeg", "é".repeat(300));
        let s = safe_file_name(&long);
        assert!(s.len() <= MAX_FILE_NAME_BYTES);
        assert!(s.ends_with(".jpeg"));
        assert!(is_safe_file_name(&s));
    }

    #[test]
    fn safe_names_are_a_fixed_point() {
        for n in [
            "../../x", "CON", "a\0b", "", "x.", " y", "ü/ö", "a:b", "lpt1", "..x", ".hidden",
        ] {
            let s = safe_file_name(n);
            assert_eq!(safe_file_name(&s), s, "{n:?}");
            assert!(is_safe_file_name(&s), "{n:?}");
        }
        assert!(!is_safe_file_name("../../x"));
        assert!(!is_safe_file_name("a/b"));
        assert!(!is_safe_file_name("NUL"));
        assert!(is_safe_file_name(".hidden"));
    }

    #[test]
    fn media_types_come_from_common_extensions_only() {
        assert_eq!(mime_for_name("a.JPG"), "image/jpeg");
        assert_eq!(mime_for_name("notes.txt"), "text/plain");
        assert_eq!(mime_for_name("Makefile"), "application/octet-stream");
        assert!(is_valid_mime(mime_for_name("x.svg")));
    }

    #[test]
    fn refs_with_unsafe_names_or_bad_types_are_refused() {
        let r = |name: &str, mime: &str| BlobRef {
            hash: BlobHash::from_bytes([1; 32]),
            name: name.into(),
            size: 3,
            mime: mime.into(),
        };
        assert!(r("a.txt", "text/plain").check().is_ok());
        assert!(matches!(
            r("../a", "text/plain").check(),
            Err(BlobRefError::UnsafeName(_))
        ));
        assert!(matches!(r("a", "").check(), Err(BlobRefError::Mime(_))));
        assert!(matches!(
            r("a", "te\nxt").check(),
            Err(BlobRefError::Mime(_))
        ));
    }
}
