use super::{normalize_path, push_escaped};

fn check(raw: &str, expect: &[u8]) {
    assert_eq!(
        &*normalize_path(raw),
        expect,
        "{raw}: got {:?}",
        String::from_utf8_lossy(&normalize_path(raw))
    );
}

#[test]
fn normalizes_as_kong() {
    check("/", b"/");
    check("", b"");
    check("/a/b", b"/a/b");
    check("/a/./b", b"/a/b");
    check("/a/../b", b"/b");
    check("/a/b/..", b"/a/");
    check("/a/b/.", b"/a/b/");
    check("/../a", b"/a");
    check("/..", b"/");
    check("/.", b"/");
    check("/a/..", b"/");
    // Slashes are merged.
    check("/foo//bar", b"/foo/bar");
    check("//", b"/");
    check("/a///b//", b"/a/b/");
    // Unreserved and other characters are decoded, reserved ones
    // upper-cased.
    check("/%61%62", b"/ab");
    check("/%2f", b"/%2F");
    check("/%2e%2E/x", b"/x");
    check("/a%20b", b"/a b");
    check("/caf%C3%A9", "/café".as_bytes());
    check("/%ff", b"/\xff");
    check("/%25", b"/%25");
    check("/%zz%4", b"/%zz%4");
    // Dots inside segments are kept.
    check("/file.txt", b"/file.txt");
    check("/a/.hidden/..b", b"/a/.hidden/..b");
}

#[test]
fn escapes_as_kong() {
    let mut out = String::new();
    push_escaped(&mut out, "/a b/%2F/~é\"{}|^`<>".as_bytes());
    assert_eq!(out, "/a%20b/%2F/~%C3%A9%22%7B%7D%7C%5E%60%3C%3E");
    out.clear();
    push_escaped(&mut out, b"/!#$&'()*+,/:;=?@[]-_.~%Az09");
    assert_eq!(out, "/!#$&'()*+,/:;=?@[]-_.~%Az09");
}
