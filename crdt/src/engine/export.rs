//! Export and import of a whole thread, document by document.
//!
//! - [`Engine::export`] loads every segment, and returns each document of the thread as one
//!   Automerge `save()` *with its genesis change*: the genesis is never stored or sent (every
//!   peer builds it), so the stored chunks of a segment do not load on their own, but an
//!   exported document does, in any Automerge implementation. Each one is loaded back before
//!   it is returned, to prove it.
//! - [`check_document`] is what an importer checks of one such file: it loads alone, its heads
//!   are the ones the manifest names, and it holds the thread's deterministic genesis for its
//!   place (so a file of another thread, or a segment under another number, is refused).
//! - [`Engine::import`] writes checked documents into an empty store as compacted snapshots,
//!   with the genesis, the format marker, the owner's actor and the task indexes. The
//!   indexes are rebuilt the way the engine rebuilds them after a merge that carried a whole
//!   document (every task key of a part is read, [`ThreadDoc::unfinished_rows`]); then the
//!   engine opens over the store as it would after a restart.

use std::collections::BTreeMap;

use automerge::{Automerge, ReadDoc};
use errand_core::TaskId;

use super::{
    DOC_HEADS, Engine, EngineConfig, EngineError, FORMAT, META_ACTOR, META_FORMAT, META_GENESIS,
    heads_bytes, write_task_index,
};
use crate::{ActorId, ChangeHash, DocId, Store, StoreError, TaskTouch, ThreadDoc, ThreadGenesis};

/// One document of the thread as exported.
#[derive(Debug, Clone)]
pub struct ExportedDoc {
    /// 0 for the meta document, n for segment n.
    pub part: u32,
    /// Its document id.
    pub doc_id: DocId,
    /// Its heads (sorted), which the bytes load to.
    pub heads: Vec<ChangeHash>,
    /// A whole `save()` of the document, genesis included.
    pub bytes: Vec<u8>,
}

/// Why a document could not be exported or imported. Each names the document's place in the
/// thread; the caller names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The engine failed (the store, or loading a stored segment).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A saved document did not load back to the same heads (an Automerge round trip that
    /// does not hold: nothing is written).
    #[error("part {part} of the thread does not load back from its own save: {why}")]
    RoundTrip {
        /// Which part.
        part: u32,
        /// What differed.
        why: String,
    },
    /// The bytes do not load as an Automerge document.
    #[error("it does not load as an Automerge document (damaged or truncated?): {0}")]
    Load(String),
    /// The bytes load, but to other heads than expected.
    #[error(
        "it loads to other heads than the manifest names (damaged, truncated or replaced): \
         expected {expected}, found {found}"
    )]
    Heads {
        /// The manifest's heads, hex.
        expected: String,
        /// The file's heads, hex.
        found: String,
    },
    /// The document does not hold the thread's genesis for its place.
    #[error(
        "it does not start from the genesis of {what} of thread {thread}: it belongs to another \
         thread, or to another place in this one"
    )]
    Genesis {
        /// "the meta document" or "segment n".
        what: String,
        /// The thread.
        thread: String,
    },
    /// The target store already holds a thread.
    #[error("this home already holds thread {0}; an import only goes into an empty home")]
    NotEmpty(String),
    /// The documents given are not a thread: no meta document, or a part twice.
    #[error("{0}")]
    Incomplete(String),
    /// The owner's actor in the genesis is not an actor id.
    #[error("the thread's genesis names an owner actor that is not an actor id: {0}")]
    BadOwnerActor(String),
}

fn hex_heads(heads: &[ChangeHash]) -> String {
    let mut v: Vec<String> = heads.iter().map(ToString::to_string).collect();
    v.sort();
    v.join(",")
}

fn sorted(heads: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut v = heads.to_vec();
    v.sort();
    v
}

/// The heads of part `n` holding nothing but its deterministic genesis.
fn genesis_heads(genesis: &ThreadGenesis, n: u32) -> Vec<ChangeHash> {
    // The actor only writes after the genesis: any will do.
    let mut doc = ThreadDoc::create(genesis, ActorId::from(&[0u8; 16][..]));
    if n == 0 {
        doc.part_mut(0).map(|p| p.heads()).unwrap_or_default()
    } else {
        doc.segment_genesis_heads(n)
    }
}

fn what(n: u32) -> String {
    if n == 0 {
        "the meta document".to_owned()
    } else {
        format!("segment {n}")
    }
}

/// Loads `bytes` as a whole Automerge document, never panicking on bad input.
fn load(bytes: &[u8]) -> Result<Automerge, TransferError> {
    match std::panic::catch_unwind(|| Automerge::load(bytes)) {
        Ok(Ok(doc)) => Ok(doc),
        Ok(Err(e)) => Err(TransferError::Load(e.to_string())),
        Err(_) => Err(TransferError::Load(
            "Automerge panicked while loading it".into(),
        )),
    }
}

/// Checks one exported document of thread `genesis` for part `n`: it loads alone, to exactly
/// `expected` heads, and holds the part's deterministic genesis.
pub fn check_document(
    genesis: &ThreadGenesis,
    n: u32,
    bytes: &[u8],
    expected: &[ChangeHash],
) -> Result<(), TransferError> {
    let doc = load(bytes)?;
    let found = sorted(&doc.get_heads());
    if found != sorted(expected) {
        return Err(TransferError::Heads {
            expected: hex_heads(expected),
            found: hex_heads(&found),
        });
    }
    let has_genesis = genesis_heads(genesis, n)
        .iter()
        .all(|h| doc.get_change_by_hash(h).is_some());
    if !has_genesis {
        return Err(TransferError::Genesis {
            what: what(n),
            thread: genesis.thread_id.to_string(),
        });
    }
    Ok(())
}

impl Engine {
    /// Every document of the thread as a whole `save()` with its genesis, oldest part first,
    /// and `f`'s read of the whole thread at the same moment (every segment is loaded for
    /// both, and released after).
    pub fn export<T>(
        &mut self,
        f: impl FnOnce(&ThreadDoc) -> T,
    ) -> Result<(Vec<ExportedDoc>, T), TransferError> {
        let stored: Vec<u32> = self.heads.keys().copied().filter(|n| *n > 0).collect();
        for n in stored {
            self.attach(n)?;
        }
        let out = self.export_loaded(f);
        self.release_idle(true);
        out
    }

    fn export_loaded<T>(
        &mut self,
        f: impl FnOnce(&ThreadDoc) -> T,
    ) -> Result<(Vec<ExportedDoc>, T), TransferError> {
        let doc = self.doc.as_mut().ok_or(EngineError::NoThread)?;
        let genesis = doc.genesis().clone();
        let mut docs = Vec::new();
        for n in doc.loaded() {
            let Some(part) = doc.part_mut(n) else {
                continue;
            };
            let heads = sorted(&part.heads());
            // A save of the document as it is, without moving the part's own save cursor.
            let bytes = part.automerge().document().save();
            check_document(&genesis, n, &bytes, &heads).map_err(|e| TransferError::RoundTrip {
                part: n,
                why: e.to_string(),
            })?;
            docs.push(ExportedDoc {
                part: n,
                doc_id: part.id().clone(),
                heads,
                bytes,
            });
        }
        Ok((docs, f(doc)))
    }

    /// Writes the documents of thread `genesis` (each checked with [`check_document`] by the
    /// caller) into `store`, which must hold no thread, and opens the engine over it. The
    /// home's actor becomes the thread owner's (`genesis.owner_actor`): the importing home
    /// continues the owner's history, so the owner must not also go on elsewhere.
    pub fn import(
        store: Store,
        config: EngineConfig,
        genesis: &ThreadGenesis,
        docs: &[(u32, &[u8])],
    ) -> Result<Self, TransferError> {
        if let Some(g) = store.meta_json::<ThreadGenesis>(META_GENESIS)? {
            return Err(TransferError::NotEmpty(g.thread_id.to_string()));
        }
        let actor = ActorId::try_from(genesis.owner_actor.as_str())
            .map_err(|_| TransferError::BadOwnerActor(genesis.owner_actor.clone()))?;
        let mut parts: BTreeMap<u32, &[u8]> = BTreeMap::new();
        for (n, bytes) in docs {
            if parts.insert(*n, bytes).is_some() {
                return Err(TransferError::Incomplete(format!(
                    "{} is given twice",
                    what(*n)
                )));
            }
        }
        let Some(meta) = parts.get(&0) else {
            return Err(TransferError::Incomplete(
                "the export has no meta document".into(),
            ));
        };
        // The whole thread in memory, to rebuild the indexes from what it holds.
        let mut thread = ThreadDoc::load([*meta], genesis, actor.clone())
            .map_err(|e| TransferError::Load(e.to_string()))?;
        for (n, bytes) in parts.iter().filter(|(n, _)| **n > 0) {
            thread
                .attach_segment(*n, [*bytes])
                .map_err(|e| TransferError::Load(e.to_string()))?;
        }
        let mut rows = Vec::new();
        for n in parts.keys() {
            let Some(heads) = thread.part_mut(*n).map(|p| p.heads()) else {
                continue;
            };
            let doc_id = if *n == 0 {
                genesis.doc_id()
            } else {
                genesis.segment_doc_id(*n)
            };
            // As after a merge that carried a whole document: every task of the part is read.
            let tasks: BTreeMap<TaskId, TaskTouch> = thread
                .task_keys(*n)
                .into_iter()
                .map(|id| (id, TaskTouch::Status))
                .collect();
            let open = thread.unfinished_rows(*n, &tasks);
            rows.push((*n, doc_id, heads, tasks, open));
        }
        store.write(|t| {
            t.put_meta_json(META_GENESIS, genesis)?;
            t.put_meta(META_FORMAT, FORMAT)?;
            t.put_meta(META_ACTOR, actor.to_bytes())?;
            for (n, doc_id, heads, tasks, open) in &rows {
                let bytes = parts.get(n).copied().unwrap_or_default();
                t.replace_snapshot(doc_id, bytes)?;
                t.table(DOC_HEADS)?
                    .insert(doc_id.as_str(), heads_bytes(heads).as_slice())?;
                write_task_index(t, *n, tasks, open)?;
            }
            Ok::<_, StoreError>(())
        })?;
        Ok(Self::open(store, config)?)
    }
}
