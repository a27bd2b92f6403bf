//! Redis's stream replies (`XREADGROUP`, `XAUTOCLAIM`, `XCLAIM`, `XRANGE`, `XPENDING`) read
//! into entries, ids and counts, in both protocols (RESP2 and RESP3). Pure: nothing here
//! talks to Redis.

use bytes::Bytes;
use redis::Value;

/// One entry as Redis returned it.
pub(super) struct RawEntry {
    pub(super) id: String,
    pub(super) fields: Vec<(String, Bytes)>,
    /// Deleted from the stream while pending: Redis returns its id without fields.
    pub(super) deleted: bool,
}

/// The entries of an `XREADGROUP` reply: RESP2 `[[key, entries]]` or RESP3 `{key: entries}`.
pub(super) fn read_reply_entries(reply: Value) -> Vec<RawEntry> {
    match reply {
        Value::Map(pairs) => pairs
            .into_iter()
            .flat_map(|(_, entries)| entries_of(entries))
            .collect(),
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|stream| {
                let mut parts = into_array(stream).into_iter();
                parts.nth(1).map(entries_of).unwrap_or_default()
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `[[id, [field, value, ...]], ...]`. A nil entry is skipped; an id with nil fields (an
/// entry deleted while pending) is marked deleted.
pub(super) fn entries_of(value: Value) -> Vec<RawEntry> {
    into_array(value)
        .into_iter()
        .filter_map(|entry| {
            let mut parts = into_array(entry).into_iter();
            let id = parts.next().and_then(text)?;
            let flat = parts.next().unwrap_or(Value::Nil);
            let deleted = matches!(flat, Value::Nil);
            let mut fields = Vec::new();
            let mut flat = into_array(flat).into_iter();
            while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                fields.push((text(name)?, bytes(value)?));
            }
            Some(RawEntry {
                id,
                fields,
                deleted,
            })
        })
        .collect()
}

pub(super) fn into_array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => Vec::new(),
    }
}

fn bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(data) => Some(Bytes::from(data)),
        Value::SimpleString(text) => Some(Bytes::from(text)),
        Value::VerbatimString { text, .. } => Some(Bytes::from(text)),
        _ => None,
    }
}

/// A field name or id as text: the reply's own buffer when it is UTF-8 (Redis ids and the
/// usual field names are), a lossy copy otherwise.
pub(super) fn text(value: Value) -> Option<String> {
    let data = match value {
        Value::BulkString(data) => data,
        Value::SimpleString(text) => return Some(text),
        Value::VerbatimString { text, .. } => return Some(text),
        _ => return None,
    };
    Some(
        String::from_utf8(data)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

pub(super) fn integer(value: Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(n).ok(),
        other => text(other)?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entries_keep_field_order_and_mark_deleted_ones() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("z"), bulk("1"), bulk("a"), bulk("2")]),
            ]),
            Value::Nil,
            Value::Array(vec![bulk("2-0"), Value::Nil]),
        ]);
        let entries = entries_of(reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "1-0");
        assert!(!entries[0].deleted);
        let names: Vec<_> = entries[0].fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["z", "a"]);
        assert_eq!(entries[1].id, "2-0");
        assert!(entries[1].deleted);
    }

    #[test]
    fn read_replies_in_both_protocols() {
        let entries = || {
            Value::Array(vec![Value::Array(vec![
                bulk("5-1"),
                Value::Array(vec![bulk("payload"), bulk("x")]),
            ])])
        };
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("orders"), entries()])]);
        let resp3 = Value::Map(vec![(bulk("orders"), entries())]);
        for reply in [resp2, resp3] {
            let got = read_reply_entries(reply);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].fields[0].1.as_ref(), b"x");
        }
        assert!(read_reply_entries(Value::Nil).is_empty());
    }
}
