//! `export DIR` (both devices) and `import DIR` (a desktop): the thread as plain files.
//!
//! - [`Export`] is a request like the others: a daemon that holds the home answers it over the
//!   control socket, else the CLI opens the home itself. It writes one `.automerge` file per
//!   document of the thread (a whole `save()` with its genesis, which loads alone in any
//!   Automerge implementation), `thread.json` (what `thread --all --json` prints), on a
//!   desktop its secret identity (`identity.key`, `discovery.key`, mode 0600) unless told
//!   not to, and last `manifest.json` ([`Manifest`]). Every file is written under a temporary
//!   name and renamed; a folder without a manifest is an unfinished export.
//! - [`import`] moves a desktop: into a home that has no store yet, it checks every file
//!   against the manifest (each document loads alone, to the manifest's heads, from the
//!   thread's genesis for its place) and the identity against the thread's owner, then
//!   writes the documents with the engine's own import (indexes rebuilt from the documents),
//!   the identity, and trust in the devices the thread records. The runner's ledger is not
//!   carried: an attempt whose `started` is in the thread is never started again.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use errand_core::{DeviceKind, time::rfc3339};
use errand_crdt::{
    ChangeHash, Store, StoreError, ThreadGenesis, TrustedPeer,
    engine::{Engine, EngineConfig, ExportedDoc, check_document},
    store::STORE_FILE,
};
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{
    ApiError, Call, exit,
    ops::{Thread, err},
    views::ThreadInfo,
};
use crate::{
    pair::META_DISCOVERY,
    peer::{META_IDENTITY, META_NAME, Peer, PeerConfig, now_ms},
};

/// The manifest's file name; written last.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The thread as `thread --all --json` prints it.
pub const THREAD_FILE: &str = "thread.json";
/// The desktop's libp2p keypair (protobuf encoding, as `errand-relay`'s `identity.key`).
pub const IDENTITY_FILE: &str = "identity.key";
/// The desktop's discovery secret (32 bytes): paired phones find it through a relay by it.
pub const DISCOVERY_FILE: &str = "discovery.key";
/// The manifest's format; an import refuses others.
pub const EXPORT_FORMAT: u32 = 1;

/// What the manifest and the CLI say about a folder that holds the secret key.
pub const SECRET_WARNING: &str = "this folder holds the desktop's secret identity key \
    (identity.key, and discovery.key once a phone paired): whoever has it can act as this desktop towards its phones. \
    Keep it private, move it only to your new machine, and delete it once imported.";

/// `export DIR`: write the thread, document by document, into a new or empty folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// The folder (absolute: a daemon's working directory is not the caller's). It must not
    /// exist, or be empty.
    pub dir: PathBuf,
    /// On a desktop, also write its secret identity (needed to import the export as this
    /// desktop on another machine). Ignored on a phone.
    #[serde(default)]
    pub identity: bool,
}

/// One document file of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentFile {
    /// File name inside the export folder.
    pub file: String,
    /// The Automerge document's id in the thread.
    pub doc_id: String,
    /// 0 for the meta document, n for segment n.
    pub segment: u32,
    /// The document's heads (hex change hashes, sorted): what the file loads to.
    pub heads: Vec<String>,
    /// File size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// Any other file of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportFile {
    /// File name inside the export folder.
    pub file: String,
    /// File size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// The device an export was made on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedBy {
    /// Its PeerId.
    pub peer_id: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Its name.
    pub name: String,
}

/// `manifest.json`, and what `export --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`EXPORT_FORMAT`].
    pub format: u32,
    /// The Errand version that wrote it.
    pub errand_version: String,
    /// The thread.
    pub thread_id: String,
    /// The thread's genesis: its owner desktop and the owner's Automerge actor.
    pub genesis: ThreadGenesis,
    /// Where it was exported from.
    pub exported_by: ExportedBy,
    /// When, UTC ms.
    pub exported_at_ms: i64,
    /// When, RFC 3339.
    pub exported_at: String,
    /// Tasks in `thread.json`.
    pub tasks: usize,
    /// Messages in `thread.json`.
    pub messages: usize,
    /// The meta document, then each segment.
    pub documents: Vec<DocumentFile>,
    /// `thread.json`.
    pub thread: ExportFile,
    /// The secret identity files (empty unless a desktop exported them).
    pub secrets: Vec<ExportFile>,
    /// Set when the folder holds secrets ([`SECRET_WARNING`]).
    pub warning: Option<String>,
}

impl Manifest {
    /// Every file the manifest names, documents first, with their sizes.
    pub fn files(&self) -> impl Iterator<Item = (&str, u64)> {
        self.documents
            .iter()
            .map(|d| (d.file.as_str(), d.bytes))
            .chain(std::iter::once((
                self.thread.file.as_str(),
                self.thread.bytes,
            )))
            .chain(self.secrets.iter().map(|s| (s.file.as_str(), s.bytes)))
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn file_name(part: u32) -> String {
    if part == 0 {
        "meta.automerge".to_owned()
    } else {
        format!("segment-{part:04}.automerge")
    }
}

fn hex_heads(heads: &[ChangeHash]) -> Vec<String> {
    let mut v: Vec<String> = heads.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

impl Call for Export {
    type Response = Manifest;
    async fn run(self, peer: &Peer) -> Result<Manifest, ApiError> {
        if !self.dir.is_absolute() {
            return Err(ApiError::with_code(
                exit::USAGE,
                format!(
                    "the export folder {} is not an absolute path",
                    self.dir.display()
                ),
            ));
        }
        let read = |d: &errand_crdt::ThreadDoc| Thread {
            thread_id: d.genesis().thread_id.to_string(),
            tasks: d.tasks(),
            messages: d.messages(),
        };
        let genesis = peer.replica().genesis().ok_or_else(|| {
            ApiError::new("this home has no thread yet: there is nothing to export")
        })?;
        let (docs, thread) = peer.replica().export(read).await.map_err(err)?;
        let identity = if self.identity && peer.kind() == DeviceKind::Desktop {
            let key = peer.keypair().to_protobuf_encoding().map_err(err)?;
            let discovery = peer
                .replica()
                .store_blocking(|s| s.meta(META_DISCOVERY))
                .await
                .map_err(err)?
                .map_err(err)?;
            Some((key, discovery))
        } else {
            None
        };
        let by = ExportedBy {
            peer_id: peer.peer_id().to_base58(),
            kind: peer.kind(),
            name: peer.name().to_owned(),
        };
        let dir = self.dir;
        tokio::task::spawn_blocking(move || {
            let mut out = Output::new(&dir)?;
            let result = write_export(&mut out, genesis, by, docs, &thread, identity);
            if result.is_err() {
                out.undo();
            }
            result
        })
        .await
        .map_err(err)?
    }
}

/// The folder an export writes into, and what it wrote so far (undone on failure).
struct Output {
    dir: PathBuf,
    created: bool,
    written: Vec<PathBuf>,
}

impl Output {
    /// Takes `dir` if it does not exist or is empty.
    fn new(dir: &Path) -> Result<Self, ApiError> {
        let created = match std::fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(ApiError::new(format!(
                        "{} is not empty: an export goes into a new or empty folder, and \
                         nothing was written",
                        dir.display()
                    )));
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    ApiError::new(format!("cannot create the folder {}: {e}", dir.display()))
                })?;
                true
            }
            Err(e) => {
                return Err(ApiError::new(format!(
                    "cannot use {} as the export folder: {e}",
                    dir.display()
                )));
            }
        };
        restrict(dir, 0o700);
        Ok(Self {
            dir: dir.to_owned(),
            created,
            written: Vec::new(),
        })
    }

    /// Writes `name` under a temporary name, flushed, then renames it into place.
    fn write(&mut self, name: &str, bytes: &[u8], secret: bool) -> Result<ExportFile, ApiError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let fail =
            |e: std::io::Error| ApiError::new(format!("cannot write {}: {e}", path.display()));
        {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            if secret {
                use std::os::unix::fs::OpenOptionsExt as _;
                options.mode(0o600);
            }
            self.written.push(tmp.clone());
            let mut f = options.open(&tmp).map_err(fail)?;
            f.write_all(bytes).map_err(fail)?;
            f.sync_all().map_err(fail)?;
        }
        std::fs::rename(&tmp, &path).map_err(fail)?;
        self.written.push(path);
        Ok(ExportFile {
            file: name.to_owned(),
            bytes: bytes.len() as u64,
            sha256: sha256(bytes),
        })
    }

    /// Removes what was written (and the folder, if this export made it).
    fn undo(&self) {
        for p in &self.written {
            let _ = std::fs::remove_file(p);
        }
        if self.created {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}
#[cfg(not(unix))]
fn restrict(_: &Path, _: u32) {}

fn write_export(
    out: &mut Output,
    genesis: ThreadGenesis,
    by: ExportedBy,
    docs: Vec<ExportedDoc>,
    thread: &Thread,
    identity: Option<(Vec<u8>, Option<Vec<u8>>)>,
) -> Result<Manifest, ApiError> {
    let mut documents = Vec::with_capacity(docs.len());
    for d in docs {
        let name = file_name(d.part);
        let f = out.write(&name, &d.bytes, false)?;
        documents.push(DocumentFile {
            file: f.file,
            doc_id: d.doc_id.to_string(),
            segment: d.part,
            heads: hex_heads(&d.heads),
            bytes: f.bytes,
            sha256: f.sha256,
        });
    }
    let info = ThreadInfo::from(thread);
    // As `thread --all --json` prints it.
    let mut json = serde_json::to_string_pretty(&info).map_err(err)?;
    json.push('\n');
    let thread_file = out.write(THREAD_FILE, json.as_bytes(), false)?;
    let mut secrets = Vec::new();
    if let Some((key, discovery)) = identity {
        secrets.push(out.write(IDENTITY_FILE, &key, true)?);
        if let Some(d) = discovery {
            secrets.push(out.write(DISCOVERY_FILE, &d, true)?);
        }
    }
    let now = now_ms();
    let manifest = Manifest {
        format: EXPORT_FORMAT,
        errand_version: env!("CARGO_PKG_VERSION").to_owned(),
        thread_id: genesis.thread_id.to_string(),
        genesis,
        exported_by: by,
        exported_at_ms: now,
        exported_at: rfc3339(now),
        tasks: thread.tasks.len(),
        messages: thread.messages.len(),
        documents,
        thread: thread_file,
        warning: (!secrets.is_empty()).then(|| SECRET_WARNING.to_owned()),
        secrets,
    };
    let mut json = serde_json::to_string_pretty(&manifest).map_err(err)?;
    json.push('\n');
    out.write(MANIFEST_FILE, json.as_bytes(), false)?;
    Ok(manifest)
}

// ---- import --------------------------------------------------------------------------------

/// What [`import`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imported {
    /// The home written.
    pub home: String,
    /// The thread.
    pub thread_id: String,
    /// This desktop's PeerId (the thread's owner).
    pub peer_id: String,
    /// Documents written.
    pub documents: usize,
    /// Tasks in the thread.
    pub tasks: usize,
    /// Unfinished tasks (the runner picks them up on `run`).
    pub unfinished: usize,
    /// Devices trusted again, from the thread's device records (PeerIds).
    pub trusted: Vec<String>,
    /// Revoked devices, kept revoked (PeerIds).
    pub revoked: Vec<String>,
}

/// Biggest manifest read: a thread of 4,096 documents lists well under 4 MiB.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Reads a file of the export folder named by the manifest, refusing names that leave it.
fn read_named(dir: &Path, name: &str, limit: Option<u64>) -> Result<Vec<u8>, ApiError> {
    let plain = Path::new(name)
        .file_name()
        .is_some_and(|f| f == std::ffi::OsStr::new(name))
        && !name.starts_with('.');
    if !plain {
        return Err(ApiError::new(format!(
            "the manifest names {name:?}, which is not a plain file name in the export folder"
        )));
    }
    let path = dir.join(name);
    let meta = std::fs::metadata(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ApiError::new(format!(
                "{name} is missing from {}: the export is incomplete",
                dir.display()
            ))
        } else {
            ApiError::new(format!("cannot read {}: {e}", path.display()))
        }
    })?;
    if let Some(limit) = limit
        && meta.len() > limit
    {
        return Err(ApiError::new(format!(
            "{name} is {} bytes, too big to be what the export wrote",
            meta.len()
        )));
    }
    std::fs::read(&path).map_err(|e| ApiError::new(format!("cannot read {}: {e}", path.display())))
}

/// Reads and parses the manifest of the export in `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ApiError> {
    if !dir.join(MANIFEST_FILE).exists() {
        return Err(ApiError::new(format!(
            "{} has no {MANIFEST_FILE}: it is not an Errand export, or an unfinished one (the \
             manifest is written last)",
            dir.display()
        )));
    }
    let bytes = read_named(dir, MANIFEST_FILE, Some(MAX_MANIFEST_BYTES))?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(format!(
            "{MANIFEST_FILE} in {} is not an Errand export manifest: {e}",
            dir.display()
        ))
    })?;
    if manifest.format != EXPORT_FORMAT {
        return Err(ApiError::new(format!(
            "{MANIFEST_FILE} is in export format {}, and this Errand ({}) reads format \
             {EXPORT_FORMAT}",
            manifest.format,
            env!("CARGO_PKG_VERSION")
        )));
    }
    if manifest.thread_id != manifest.genesis.thread_id.to_string() {
        return Err(ApiError::new(format!(
            "{MANIFEST_FILE} names thread {} but its genesis is of thread {}",
            manifest.thread_id, manifest.genesis.thread_id
        )));
    }
    Ok(manifest)
}

/// Checks every document of the export in `dir` against `manifest`; returns (segment, bytes)
/// for each. An error names the file.
pub fn check_documents(dir: &Path, manifest: &Manifest) -> Result<Vec<(u32, Vec<u8>)>, ApiError> {
    let genesis = &manifest.genesis;
    let mut out = Vec::with_capacity(manifest.documents.len());
    for d in &manifest.documents {
        let name = d.file.as_str();
        let expected_id = if d.segment == 0 {
            genesis.doc_id()
        } else {
            genesis.segment_doc_id(d.segment)
        };
        if d.doc_id != expected_id.as_str() {
            return Err(ApiError::new(format!(
                "{name}: the manifest gives it document id {}, but segment {} of thread {} is {}",
                d.doc_id, d.segment, manifest.thread_id, expected_id
            )));
        }
        let heads: Vec<ChangeHash> = d
            .heads
            .iter()
            .map(|h| h.parse())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                ApiError::new(format!(
                    "{name}: the manifest's heads for it are not change hashes"
                ))
            })?;
        let bytes = read_named(dir, name, None)?;
        check_document(genesis, d.segment, &bytes, &heads)
            .map_err(|e| ApiError::new(format!("{name} is refused: {e}")))?;
        if sha256(&bytes) != d.sha256 {
            return Err(ApiError::new(format!(
                "{name} is refused: its SHA-256 differs from the manifest's (the file was changed)"
            )));
        }
        out.push((d.segment, bytes));
    }
    if !out.iter().any(|(n, _)| *n == 0) {
        return Err(ApiError::new(format!(
            "{MANIFEST_FILE} lists no meta document (meta.automerge): the export is incomplete"
        )));
    }
    Ok(out)
}

/// The secrets of a desktop's export: its keypair, checked to be the thread owner's, and its
/// discovery secret if there is one.
fn read_identity(dir: &Path, manifest: &Manifest) -> Result<(Vec<u8>, Option<Vec<u8>>), ApiError> {
    let owner = manifest.genesis.owner.as_str();
    if manifest.exported_by.kind != DeviceKind::Desktop || manifest.exported_by.peer_id != owner {
        return Err(ApiError::new(format!(
            "this export was made on {} {}, not on the thread's desktop {owner}: only a \
             desktop's own export can be imported as that desktop",
            manifest.exported_by.kind.as_str(),
            manifest.exported_by.peer_id
        )));
    }
    let Some(entry) = manifest.secrets.iter().find(|s| s.file == IDENTITY_FILE) else {
        return Err(ApiError::new(format!(
            "this export has no {IDENTITY_FILE} (it was made with --no-identity): the thread \
             belongs to desktop {owner}, and its phones trust only that identity, so a desktop \
             with another key could not continue it. Export again without --no-identity"
        )));
    };
    let key = read_named(dir, &entry.file, Some(64 << 10))?;
    if sha256(&key) != entry.sha256 {
        return Err(ApiError::new(format!(
            "{IDENTITY_FILE} is refused: its SHA-256 differs from the manifest's"
        )));
    }
    let pair = Keypair::from_protobuf_encoding(&key).map_err(|e| {
        ApiError::new(format!(
            "{IDENTITY_FILE} is refused: it is not a keypair ({e})"
        ))
    })?;
    let id = pair.public().to_peer_id().to_base58();
    if id != owner {
        return Err(ApiError::new(format!(
            "{IDENTITY_FILE} is the key of {id}, but the thread belongs to desktop {owner}"
        )));
    }
    let discovery = match manifest.secrets.iter().find(|s| s.file == DISCOVERY_FILE) {
        Some(entry) => {
            let d = read_named(dir, &entry.file, Some(1024))?;
            if d.len() != 32 || sha256(&d) != entry.sha256 {
                return Err(ApiError::new(format!(
                    "{DISCOVERY_FILE} is refused: it is not the 32-byte secret the manifest names"
                )));
            }
            Some(d)
        }
        None => None,
    };
    Ok((key, discovery))
}

/// `import DIR` on a desktop: makes `home`, which must have no store yet, the desktop that
/// exported `dir`. Nothing is written before every file checked out; a failure after that
/// removes the store again.
pub async fn import(home: &Path, dir: &Path) -> Result<Imported, ApiError> {
    let store_file = home.join(STORE_FILE);
    if store_file.exists() {
        return Err(ApiError::new(format!(
            "the home {} already has a store ({STORE_FILE}): an import only goes into a new, \
             empty home and never over an existing one; choose another --home",
            home.display()
        )));
    }
    let (home, dir) = (home.to_owned(), dir.to_owned());
    let imported = tokio::task::spawn_blocking({
        let (home, dir) = (home.clone(), dir.clone());
        move || {
            let manifest = read_manifest(&dir)?;
            let secrets = read_identity(&dir, &manifest)?;
            let docs = check_documents(&dir, &manifest)?;
            let store = Store::open(&home).map_err(err)?;
            let result = write_home(store, &manifest, &docs, secrets);
            if result.is_err() {
                // The store was made here, a moment ago: leave the home as it was.
                let _ = std::fs::remove_file(home.join(STORE_FILE));
            }
            result
        }
    })
    .await
    .map_err(err)??;
    if let Err(e) = opens_as_owner(&home, &imported).await {
        let _ = std::fs::remove_file(home.join(STORE_FILE));
        return Err(e);
    }
    Ok(imported)
}

/// Opens the imported home as `run` will, to be sure it does, as the thread's desktop.
async fn opens_as_owner(home: &Path, imported: &Imported) -> Result<(), ApiError> {
    let peer = Peer::open(PeerConfig {
        home: home.to_owned(),
        kind: DeviceKind::Desktop,
        name: None,
        listen: Vec::new(),
        mdns: false,
        relays: Vec::new(),
        relay_only: false,
        blob_caps: Default::default(),
    })
    .map_err(|e| ApiError::new(format!("the imported home does not open: {e}")))?;
    let owns = peer.replica().read(|d| d.owns_thread()).await.map_err(err);
    let same = peer.peer_id().to_base58() == imported.peer_id;
    peer.shutdown().await;
    drop(peer);
    if !(owns? && same) {
        return Err(ApiError::new(
            "the imported home does not open as the thread's desktop",
        ));
    }
    Ok(())
}

/// Writes the home's identity, then the thread (the engine's import), then trust in the
/// devices the thread records.
fn write_home(
    store: Store,
    manifest: &Manifest,
    docs: &[(u32, Vec<u8>)],
    (key, discovery): (Vec<u8>, Option<Vec<u8>>),
) -> Result<Imported, ApiError> {
    let home = store.home().to_owned();
    let name = manifest.exported_by.name.clone();
    store
        .write(|t| {
            t.put_meta(META_IDENTITY, &key)?;
            if let Some(d) = &discovery {
                t.put_meta(META_DISCOVERY, d)?;
            }
            if !name.is_empty() {
                t.put_meta(META_NAME, name.as_bytes())?;
            }
            Ok::<_, StoreError>(())
        })
        .map_err(err)?;
    let parts: Vec<(u32, &[u8])> = docs.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    let mut engine = Engine::import(store, EngineConfig::default(), &manifest.genesis, &parts)
        .map_err(|e| ApiError::new(format!("the import failed: {e}")))?;
    let owner = manifest.genesis.owner.clone();
    let devices = engine.doc().map(|d| d.devices()).unwrap_or_default();
    let trusted: Vec<TrustedPeer> = devices
        .into_iter()
        .filter(|d| d.id != owner)
        .map(|d| TrustedPeer {
            id: d.id,
            name: d.name,
            kind: d.kind,
            addrs: Vec::new(),
            paired_at: d.added_at,
            last_seen: None,
            last_sync_at: None,
            revoked: d.revoked_at.is_some(),
        })
        .collect();
    engine
        .store()
        .write(|t| {
            for p in &trusted {
                t.put_trusted(p)?;
            }
            Ok::<_, StoreError>(())
        })
        .map_err(err)?;
    let tasks = engine.read_all(|d| d.tasks().len()).map_err(err)?;
    let (revoked, trusted): (Vec<_>, Vec<_>) = trusted.into_iter().partition(|p| p.revoked);
    Ok(Imported {
        home: home.display().to_string(),
        thread_id: manifest.thread_id.clone(),
        peer_id: owner.to_string(),
        documents: docs.len(),
        tasks,
        unfinished: engine.open_tasks().len(),
        trusted: trusted.into_iter().map(|p| p.id.to_string()).collect(),
        revoked: revoked.into_iter().map(|p| p.id.to_string()).collect(),
    })
}

#[cfg(test)]
mod tests;
