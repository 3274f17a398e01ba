//! The request's header fields as plugins read and change them.
//!
//! Most chains only look up a field or two and set a few (an auth plugin
//! reads `apikey` and sets `X-Consumer-*`). Building a `HeaderMap` for
//! that hashes and copies every field of every request; instead the
//! fields stay where the HTTP/1.1 engine parsed them, changes are kept
//! beside them, and the upstream head is written from both. A plugin that
//! needs the whole map (request-transformer, a log entry) gets one, built
//! once; from then on the map is the request's headers.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

pub(crate) struct RequestHeaders<'a> {
    /// The client's fields, as the HTTP/1.1 engine parsed them.
    raw: &'a [httparse::Header<'a>],
    /// Fields plugins set (`Some`) or removed (`None`), at most one entry
    /// per name; they hide every raw field of that name. An auth plugin
    /// sets three or four.
    edits: SmallVec<[(HeaderName, Option<HeaderValue>); 4]>,
    /// Some edit names a field the client sent. Consumer fields usually
    /// name none, and then the client's fields go upstream unchecked.
    hiding: bool,
    /// Once made, the request's headers: `raw` and `edits` are folded in.
    map: OnceLock<HeaderMap>,
}

impl<'a> RequestHeaders<'a> {
    /// Fields parsed from a request head.
    pub(crate) fn parsed(raw: &'a [httparse::Header<'a>]) -> RequestHeaders<'a> {
        RequestHeaders {
            raw,
            edits: SmallVec::new(),
            hiding: false,
            map: OnceLock::new(),
        }
    }

    /// Fields the hyper engine already holds as a map.
    pub(crate) fn from_map(map: HeaderMap) -> RequestHeaders<'a> {
        RequestHeaders {
            raw: &[],
            edits: SmallVec::new(),
            hiding: false,
            map: OnceLock::from(map),
        }
    }

    /// The first value of a field (names match in any case).
    pub(crate) fn get(&self, name: impl AsRef<str>) -> Option<&[u8]> {
        let name = name.as_ref();
        if let Some(map) = self.map.get() {
            return map.get(name).map(HeaderValue::as_bytes);
        }
        if let Some(edited) = self.edit(name) {
            return edited.map(HeaderValue::as_bytes);
        }
        self.raw
            .iter()
            .find(|field| field.name.eq_ignore_ascii_case(name))
            .map(|field| field.value)
    }

    /// The first value of a field, when it is text.
    pub(crate) fn get_str(&self, name: impl AsRef<str>) -> Option<&str> {
        self.get(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// Every value of a field, in order.
    pub(crate) fn get_all<'s, N: AsRef<str> + 's>(
        &'s self,
        name: N,
    ) -> impl Iterator<Item = &'s [u8]> + 's {
        let (mapped, edited, raw) = match self.map.get() {
            Some(map) => (Some(map.get_all(name.as_ref()).iter()), None, &[][..]),
            None => match self.edit(name.as_ref()) {
                Some(value) => (None, value, &[][..]),
                None => (None, None, self.raw),
            },
        };
        let mapped = mapped.into_iter().flatten().map(HeaderValue::as_bytes);
        let edited = edited.into_iter().map(HeaderValue::as_bytes);
        let parsed = raw
            .iter()
            .filter(move |field| field.name.eq_ignore_ascii_case(name.as_ref()))
            .map(|field| field.value);
        mapped.chain(edited).chain(parsed)
    }

    pub(crate) fn contains(&self, name: impl AsRef<str>) -> bool {
        self.get(name).is_some()
    }

    /// Sets a field, replacing every value it had.
    pub(crate) fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        match self.map.get_mut() {
            Some(map) => {
                map.insert(name, value);
            }
            None => self.set_edit(name, Some(value)),
        }
    }

    /// Removes every value of a field.
    pub(crate) fn remove(&mut self, name: impl AsRef<str>) {
        let name = name.as_ref();
        if let Some(map) = self.map.get_mut() {
            map.remove(name);
            return;
        }
        // Nothing to hide: an absent field, the common case, costs no edit.
        if self.edit(name).is_none() && !self.raw_has(name) {
            return;
        }
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            self.set_edit(name, None);
        }
    }

    /// The headers as a map, made on first use.
    pub(crate) fn map(&self) -> &HeaderMap {
        self.map.get_or_init(|| self.build())
    }

    /// The headers as a map to change in any way.
    pub(crate) fn map_mut(&mut self) -> &mut HeaderMap {
        if self.map.get().is_none() {
            let map = self.build();
            self.edits.clear();
            self.map = OnceLock::from(map);
        }
        self.map
            .get_mut()
            .unwrap_or_else(|| unreachable!("set above"))
    }

    /// The headers as a map to own.
    pub(crate) fn into_map(mut self) -> HeaderMap {
        self.map_mut();
        self.map.take().unwrap_or_default()
    }

    /// Every field in order, without building a map: the client's fields
    /// that no plugin touched, then the ones plugins set.
    pub(crate) fn for_each<'s>(&'s self, mut f: impl FnMut(&'s [u8], &'s [u8])) {
        if let Some(map) = self.map.get() {
            map.iter()
                .for_each(|(name, value)| f(name.as_str().as_bytes(), value.as_bytes()));
            return;
        }
        for field in self.raw {
            if !self.hiding || self.edit(field.name).is_none() {
                f(field.name.as_bytes(), field.value);
            }
        }
        for (name, value) in &self.edits {
            if let Some(value) = value {
                f(name.as_str().as_bytes(), value.as_bytes());
            }
        }
    }

    /// The edit of a field, if a plugin made one: `Some(None)` when the
    /// field was removed.
    fn edit(&self, name: &str) -> Option<Option<&HeaderValue>> {
        self.edits
            .iter()
            .find(|(edited, _)| edited.as_str().eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_ref())
    }

    fn raw_has(&self, name: &str) -> bool {
        self.raw
            .iter()
            .any(|field| field.name.eq_ignore_ascii_case(name))
    }

    fn set_edit(&mut self, name: HeaderName, value: Option<HeaderValue>) {
        self.hiding = self.hiding || self.raw_has(name.as_str());
        match self.edits.iter_mut().find(|(edited, _)| *edited == name) {
            Some(edit) => edit.1 = value,
            None => self.edits.push((name, value)),
        }
    }

    fn build(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.raw.len() + self.edits.len());
        for field in self.raw {
            if self.edit(field.name).is_some() {
                continue;
            }
            // httparse accepts the same names and values as `http`; a
            // field either refuses cannot reach a plugin.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(field.name.as_bytes()),
                HeaderValue::from_bytes(field.value),
            ) {
                map.append(name, value);
            }
        }
        for (name, value) in &self.edits {
            if let Some(value) = value {
                map.insert(name.clone(), value.clone());
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed<'h>(
        head: &'h [u8],
        fields: &'h mut [httparse::Header<'h>],
    ) -> &'h [httparse::Header<'h>] {
        let mut request = httparse::Request::new(fields);
        assert!(request.parse(head).expect("parses").is_complete());
        request.headers
    }

    /// The field names in the order they go upstream.
    fn names(headers: &RequestHeaders<'_>) -> Vec<String> {
        let mut names = Vec::new();
        headers.for_each(|name, _| names.push(String::from_utf8_lossy(name).into_owned()));
        names
    }

    const HEAD: &[u8] =
        b"GET / HTTP/1.1\r\nHost: a.test\r\nApiKey: k1\r\nX-List: 1\r\nx-list: 2\r\n\r\n";

    #[test]
    fn reads_parsed_fields_in_any_case_and_edits_over_them() {
        let mut storage = [httparse::EMPTY_HEADER; 8];
        let raw = parsed(HEAD, &mut storage);
        let mut headers = RequestHeaders::parsed(raw);
        assert_eq!(headers.get_str("apikey"), Some("k1"));
        assert_eq!(headers.get_all("X-LIST").collect::<Vec<_>>(), [b"1", b"2"]);
        headers.insert(
            HeaderName::from_static("x-list"),
            HeaderValue::from_static("3"),
        );
        headers.remove("ApiKey");
        headers.remove(HeaderName::from_static("absent"));
        assert_eq!(headers.get_all("x-list").collect::<Vec<_>>(), [b"3"]);
        assert!(!headers.contains("apikey"));
        // Removing an absent field records nothing.
        assert_eq!(headers.edits.len(), 2);
        let mut fields = Vec::new();
        headers.for_each(|name, value| fields.push((name.to_vec(), value.to_vec())));
        assert_eq!(
            fields,
            [
                (b"Host".to_vec(), b"a.test".to_vec()),
                (b"x-list".to_vec(), b"3".to_vec()),
            ]
        );
    }

    #[test]
    fn new_fields_follow_the_clients_own() {
        let mut storage = [httparse::EMPTY_HEADER; 8];
        let raw = parsed(HEAD, &mut storage);
        let mut headers = RequestHeaders::parsed(raw);
        headers.insert(
            HeaderName::from_static("x-consumer-id"),
            HeaderValue::from_static("c1"),
        );
        headers.remove("x-anonymous-consumer");
        assert_eq!(
            names(&headers),
            ["Host", "ApiKey", "X-List", "x-list", "x-consumer-id"]
        );
        // A later edit of a field the client sent hides it.
        headers.remove("apikey");
        assert_eq!(
            names(&headers),
            ["Host", "X-List", "x-list", "x-consumer-id"]
        );
    }

    #[test]
    fn the_map_holds_the_edits_and_takes_later_ones() {
        let mut storage = [httparse::EMPTY_HEADER; 8];
        let raw = parsed(HEAD, &mut storage);
        let mut headers = RequestHeaders::parsed(raw);
        headers.insert(
            HeaderName::from_static("x-consumer-id"),
            HeaderValue::from_static("c1"),
        );
        let map = headers.map();
        assert_eq!(map.get_all("x-list").iter().count(), 2);
        assert_eq!(map["x-consumer-id"], "c1");
        assert!(headers.map.get().is_some());
        headers.remove(HeaderName::from_static("x-list"));
        headers
            .map_mut()
            .append("x-new", HeaderValue::from_static("n"));
        assert_eq!(headers.get("x-list"), None);
        assert_eq!(headers.get_str("x-new"), Some("n"));
        assert_eq!(
            names(&headers),
            ["host", "apikey", "x-consumer-id", "x-new"]
        );
    }
}
