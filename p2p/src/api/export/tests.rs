use super::*;
use crate::api::Request;

#[test]
fn the_export_request_keeps_its_wire_shape() {
    let req = Request::from(Export {
        dir: PathBuf::from("/tmp/e"),
        identity: true,
    });
    let wire = serde_json::to_string(&req).unwrap();
    assert_eq!(wire, r#"{"cmd":"export","dir":"/tmp/e","identity":true}"#);
    // `identity` may be left out: no secret unless asked for.
    let back: Request = serde_json::from_str(r#"{"cmd":"export","dir":"/tmp/e"}"#).unwrap();
    assert_eq!(
        back,
        Request::Export(Export {
            dir: PathBuf::from("/tmp/e"),
            identity: false
        })
    );
}

#[test]
fn document_files_sort_in_thread_order() {
    let names: Vec<String> = [0, 1, 2, 10, 9999].into_iter().map(file_name).collect();
    assert_eq!(
        names,
        [
            "meta.automerge",
            "segment-0001.automerge",
            "segment-0002.automerge",
            "segment-0010.automerge",
            "segment-9999.automerge"
        ]
    );
}

#[test]
fn a_manifest_may_not_name_files_outside_the_export() {
    let dir = std::env::temp_dir();
    for bad in ["../x", "/etc/passwd", "a/b", ".hidden", ""] {
        let e = read_named(&dir, bad, None).unwrap_err();
        assert!(e.message.contains("not a plain file name"), "{bad}: {e:?}");
    }
}
