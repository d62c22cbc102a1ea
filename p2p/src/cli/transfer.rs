//! `export DIR` and `import DIR` as both CLIs print them.

use std::path::{Path, PathBuf};

use super::{Opened, init_logging, print_json, printable};
use crate::{
    api::{
        exit,
        export::{self, Export, Imported, Manifest},
    },
    control::ApiError,
};

/// `dir` made absolute against this process's working directory (a daemon that writes the
/// export has another one).
fn absolute(dir: &Path) -> Result<PathBuf, ApiError> {
    std::path::absolute(dir).map_err(|e| {
        ApiError::with_code(
            exit::USAGE,
            format!("cannot use {} as a folder: {e}", dir.display()),
        )
    })
}

/// `export DIR`: through the daemon that holds the home, or on this process's own opening of
/// it. `identity`: on a desktop, also write its secret identity.
pub async fn export(
    opened: &Opened,
    dir: &Path,
    identity: bool,
    json: bool,
) -> Result<(), ApiError> {
    let dir = absolute(dir)?;
    let manifest = opened
        .call(Export {
            dir: dir.clone(),
            identity,
        })
        .await?;
    if json {
        print_json(&manifest);
    } else {
        show_export(&dir, &manifest);
    }
    if let Some(w) = &manifest.warning {
        eprintln!("warning: {w}");
    }
    Ok(())
}

fn show_export(dir: &Path, m: &Manifest) {
    println!(
        "exported thread {} from {} {} into {}",
        printable(&m.thread_id, false),
        m.exported_by.kind.as_str(),
        printable(&m.exported_by.peer_id, false),
        dir.display()
    );
    for d in &m.documents {
        let what = if d.segment == 0 {
            "meta document".to_owned()
        } else {
            format!("segment {}", d.segment)
        };
        println!("  {:<26} {:>10} bytes  {what}", d.file, d.bytes);
    }
    println!(
        "  {:<26} {:>10} bytes  {} tasks, {} messages",
        m.thread.file, m.thread.bytes, m.tasks, m.messages
    );
    for s in &m.secrets {
        println!("  {:<26} {:>10} bytes  SECRET", s.file, s.bytes);
    }
    println!("  {}", export::MANIFEST_FILE);
    println!(
        "{} documents, {} tasks, {} messages",
        m.documents.len(),
        m.tasks,
        m.messages
    );
}

/// `import DIR` on a desktop (the home must have no store yet).
pub async fn import(home: &Path, dir: &Path, json: bool) -> Result<(), ApiError> {
    init_logging("warn");
    let dir = absolute(dir)?;
    let home = absolute(home)?;
    let imported = export::import(&home, &dir).await?;
    if json {
        print_json(&imported);
    } else {
        show_import(&dir, &imported);
    }
    Ok(())
}

fn show_import(dir: &Path, i: &Imported) {
    println!(
        "imported thread {} into {} as desktop {}",
        i.thread_id, i.home, i.peer_id
    );
    println!(
        "{} documents, {} tasks ({} unfinished); trusted again: {} device(s){}",
        i.documents,
        i.tasks,
        i.unfinished,
        i.trusted.len(),
        if i.revoked.is_empty() {
            String::new()
        } else {
            format!(", {} revoked", i.revoked.len())
        }
    );
    for id in &i.trusted {
        println!("  trusted {id}");
    }
    println!(
        "start it with: errand-desktop --home {} run (copy config.toml over first if you had one)",
        i.home
    );
    println!(
        "do not run the old desktop again: two desktops with one identity would write the same \
         history twice"
    );
    eprintln!(
        "warning: {} holds this desktop's secret identity key; delete it now that it is imported",
        dir.display()
    );
}
