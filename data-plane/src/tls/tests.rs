use super::SniIndex;

/// Which SNI entity serves `server_name` among `snis`; `None`: the default
/// certificate.
fn check(snis: &[&'static str], server_name: Option<&str>, expect: Option<&str>) {
    let index = SniIndex::build(snis.iter().map(|name| (*name, *name)));
    assert_eq!(
        index.find(server_name).copied(),
        expect,
        "{server_name:?} among {snis:?}"
    );
}

#[test]
fn kong_sni_precedence() {
    let all = ["a.example.com", "*.example.com", "a.example.*", "*"];
    // Exact beats a leading wildcard, which beats a trailing one, which
    // beats `*`.
    check(&all, Some("a.example.com"), Some("a.example.com"));
    check(&all, Some("b.example.com"), Some("*.example.com"));
    check(&all, Some("a.example.org"), Some("a.example.*"));
    check(&all, Some("unknown.test"), Some("*"));
    check(
        &["*.example.com", "b.example.*"],
        Some("b.example.com"),
        Some("*.example.com"),
    );
    // Names compare without case and without the root's trailing dot.
    check(&all, Some("A.Example.COM."), Some("a.example.com"));
    check(
        &["API.Example.com"],
        Some("api.example.com"),
        Some("API.Example.com"),
    );
}

#[test]
fn wildcards_replace_one_label() {
    check(&["*.example.com"], Some("a.b.example.com"), None);
    check(
        &["*.b.example.com"],
        Some("a.b.example.com"),
        Some("*.b.example.com"),
    );
    // Kong's leading wildcard needs two labels after the first.
    check(&["*.com"], Some("example.com"), None);
    check(&["*.example.com"], Some("example.com"), None);
    check(&["example.*"], Some("example.com"), Some("example.*"));
    check(&["example.*"], Some("example.co.uk"), None);
    check(
        &["example.co.*"],
        Some("example.co.uk"),
        Some("example.co.*"),
    );
    check(&["localhost"], Some("localhost"), Some("localhost"));
    check(&["*.example.com", "example.*"], Some("localhost"), None);
}

#[test]
fn clients_without_sni_get_the_default() {
    check(&["*", "a.test"], None, None);
    check(&[], Some("a.test"), None);
}
