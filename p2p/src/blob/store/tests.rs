use std::collections::HashSet;

use errand_crdt::Store;

use super::*;

fn store(dir: &Path) -> BlobStore {
    let replica = Replica::open(Store::open(dir).unwrap()).unwrap();
    BlobStore::new(dir, replica)
}

fn add(s: &BlobStore, dir: &Path, name: &str, len: usize) -> BlobHash {
    let src = dir.join(name);
    fs::write(&src, vec![name.as_bytes()[0]; len]).unwrap();
    s.add_file(&src).unwrap().0
}

#[test]
fn caps_are_checked_when_made_and_kept_when_storing() {
    assert!(matches!(BlobCaps::new(0, 10), Err(CapsError::Zero { .. })));
    assert!(matches!(
        BlobCaps::new(11, 10),
        Err(CapsError::BlobOverTotal { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).with_caps(BlobCaps::new(100_000, 150_000).unwrap());
    add(&s, dir.path(), "a", 90_000);
    let big = dir.path().join("big");
    fs::write(&big, vec![1u8; 100_001]).unwrap();
    assert!(matches!(
        s.add_file(&big),
        Err(BlobError::TooLarge { max: 100_000, .. })
    ));
    let more = dir.path().join("more");
    fs::write(&more, vec![2u8; 90_000]).unwrap();
    assert!(matches!(
        s.add_file(&more),
        Err(BlobError::StoreFull { max: 150_000, .. })
    ));
}

#[test]
fn retain_removes_unkept_blobs_partials_and_strays_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let kept = add(&s, dir.path(), "k", 40_000);
    let dropped = add(&s, dir.path(), "d", 40_000);
    // A partial blob: reserved and cut to its verified prefix, never finished.
    let partial = BlobHash::from_bytes(*blake3::hash(b"never finished").as_bytes());
    s.receive(partial, 50_000).unwrap();
    // A file no index row names (a crash between removing the row and the file).
    let stray = dir
        .path()
        .join(BLOB_DIR)
        .join(blake3::hash(b"x").to_hex().as_str());
    fs::write(&stray, b"x").unwrap();

    let done = s.retain(&HashSet::from([kept])).unwrap();
    assert_eq!(
        done,
        Collected {
            blobs: 2,
            bytes: 90_000,
            strays: 1
        }
    );
    assert!(s.path(&kept).unwrap().is_some_and(|p| p.exists()));
    assert!(s.entry(&dropped).unwrap().is_none());
    assert!(s.entry(&partial).unwrap().is_none());
    assert!(!s.whole(&dropped).exists() && !s.whole_outboard(&dropped).exists());
    assert!(!s.partial(&partial).exists() && !stray.exists());
    // Nothing left to remove the second time.
    assert_eq!(
        s.retain(&HashSet::from([kept])).unwrap(),
        Collected::default()
    );
}

#[test]
fn a_whole_blob_removed_or_cut_on_disk_is_forgotten_so_it_can_be_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let removed = add(&s, dir.path(), "r", 40_000);
    let cut = add(&s, dir.path(), "c", 40_000);
    let kept = add(&s, dir.path(), "k", 40_000);
    fs::remove_file(s.whole(&removed)).unwrap();
    OpenOptions::new()
        .write(true)
        .open(s.whole(&cut))
        .unwrap()
        .set_len(1_000)
        .unwrap();

    assert_eq!(s.path(&removed).unwrap(), None);
    assert_eq!(s.path(&cut).unwrap(), None);
    assert!(s.entry(&removed).unwrap().is_none() && s.entry(&cut).unwrap().is_none());
    assert!(!s.whole(&cut).exists() && !s.whole_outboard(&cut).exists());
    assert_eq!(s.path(&kept).unwrap(), Some(s.whole(&kept)));
    // Forgotten, the blob is received again from the start.
    assert_eq!(s.receive(removed, 40_000).unwrap().verified_upto(), 0);
}

#[test]
fn a_partial_blob_changed_on_disk_is_cut_back_to_its_last_good_group_when_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut b = tree::OutboardBuilder::new();
    b.update(&data);
    let (root, size, outboard) = b.finish();
    let hash = BlobHash::from_bytes(*root.as_bytes());
    let group = tree::GROUP as usize;

    let mut p = s.receive(hash, size).unwrap();
    p.set_outboard(outboard).unwrap();
    p.append(&data[..4 * group]).unwrap();
    p.flush().unwrap();
    drop(p);
    // Reopened untouched: the whole prefix holds.
    let p = s.receive(hash, size).unwrap();
    assert_eq!(p.verified_upto(), 4 * group as u64);
    drop(p);

    // A bit flips in the second group while no one holds the blob.
    let path = s.partial(&hash);
    let mut bytes = fs::read(&path).unwrap();
    bytes[group + 100] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let mut p = s.receive(hash, size).unwrap();
    assert_eq!(p.verified_upto(), group as u64, "the bad group was kept");
    assert_eq!(fs::metadata(&path).unwrap().len(), group as u64);
    assert_eq!(s.entry(&hash).unwrap().unwrap().verified_upto, group as u64);
    p.append(&data[group..]).unwrap();
    assert!(p.is_complete());
    let whole = s.path(&hash).unwrap().expect("the blob is whole");
    assert_eq!(fs::read(whole).unwrap(), data);
}
