//! Helpers the data plane's integration tests share.

/// The message of Kong's JSON error template (`{"message":…,"request_id":…}`,
/// laid out as Kong lays it out), after checking the template and the id.
pub(crate) fn kong_error(body: &[u8]) -> String {
    let text = std::str::from_utf8(body).expect("utf-8 body");
    let rest = text
        .strip_prefix("{\n  \"message\":\"")
        .unwrap_or_else(|| panic!("not Kong's error template: {text}"));
    let (message, rest) = rest
        .split_once("\",\n  \"request_id\":\"")
        .expect("request_id");
    let id = rest.strip_suffix("\"\n}").expect("template end");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{text}"
    );
    message.to_owned()
}
