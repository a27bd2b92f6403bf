//! The keyspace mode's setting `key_map`: which cache key a changed source key invalidates.
//!
//! `key_map` is a table from source key prefixes to cache key prefixes; in the manifest,
//! `key_map = { "db:" = "cache:" }`, which the host hands over as the JSON object
//! `{"db:":"cache:"}`. A changed key is mapped by the longest source prefix it starts with:
//! that prefix is replaced by its cache prefix, and the rest of the key is kept as it is
//! (`db:user:42` becomes `cache:user:42`).

use serde_json::Value;

/// The name of the setting, for error messages.
pub const SETTING: &str = "key_map";

/// Source prefix to cache prefix pairs, longest source prefix first.
#[derive(Debug, PartialEq)]
pub struct KeyMap(Vec<(String, String)>);

impl KeyMap {
    /// Reads the setting's value as the host gives it (a JSON object); the error names the
    /// setting and what is wrong with it.
    pub fn parse(setting: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(setting).map_err(|_| {
            format!(
                "setting `{SETTING}` must be a table of key prefixes, such as \
                 {{ \"db:\" = \"cache:\" }}, got {setting:?}"
            )
        })?;
        let Value::Object(table) = value else {
            return Err(format!(
                "setting `{SETTING}` must be a table of key prefixes, such as \
                 {{ \"db:\" = \"cache:\" }}, got {setting}"
            ));
        };
        if table.is_empty() {
            return Err(format!("setting `{SETTING}` is an empty table"));
        }
        let mut pairs = Vec::with_capacity(table.len());
        for (source, cache) in table {
            // An empty source prefix would map every key the plugin hears of, and an empty
            // cache prefix would invalidate the application's own keys under another name.
            if source.is_empty() {
                return Err(format!(
                    "setting `{SETTING}`: a source prefix is empty (it would match every key)"
                ));
            }
            match cache {
                Value::String(cache) if cache.is_empty() => {
                    return Err(format!(
                        "setting `{SETTING}`: the cache prefix of {source:?} is empty"
                    ));
                }
                Value::String(cache) => pairs.push((source, cache)),
                other => {
                    return Err(format!(
                        "setting `{SETTING}`: the cache prefix of {source:?} must be a string, \
                         got {other}"
                    ));
                }
            }
        }
        // Longest first, so that `db:user:` wins over `db:` for `db:user:42`.
        pairs.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(Self(pairs))
    }

    /// The cache key `key` invalidates, or `None` when no source prefix starts it.
    pub fn map(&self, key: &str) -> Option<String> {
        self.0.iter().find_map(|(source, cache)| {
            key.strip_prefix(source.as_str())
                .map(|rest| format!("{cache}{rest}"))
        })
    }

    /// The cache prefixes, each once, in order.
    pub fn cache_prefixes(&self) -> Vec<&str> {
        let mut prefixes: Vec<&str> = self.0.iter().map(|(_, cache)| cache.as_str()).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        prefixes
    }

    /// The source prefixes, for error messages: `"db:", "legacy:"`.
    pub fn sources(&self) -> String {
        let mut sources: Vec<String> = self.0.iter().map(|(s, _)| format!("{s:?}")).collect();
        sources.sort();
        sources.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(setting: &str, key: &str) -> Option<String> {
        KeyMap::parse(setting).unwrap().map(key)
    }

    #[test]
    fn replaces_the_source_prefix_and_keeps_the_rest() {
        let setting = r#"{"db:":"cache:"}"#;
        assert_eq!(map(setting, "db:user:42").as_deref(), Some("cache:user:42"));
        assert_eq!(
            map(setting, "db:order:A-17").as_deref(),
            Some("cache:order:A-17")
        );
        // Bytes after the prefix are kept exactly, glob characters included.
        assert_eq!(map(setting, "db:we*rd:?").as_deref(), Some("cache:we*rd:?"));
    }

    #[test]
    fn a_key_no_source_prefix_starts_maps_to_nothing() {
        let setting = r#"{"db:":"cache:"}"#;
        assert_eq!(map(setting, "user:42"), None);
        assert_eq!(map(setting, "DB:user:42"), None);
        assert_eq!(map(setting, "cache:user:42"), None);
    }

    #[test]
    fn the_longest_source_prefix_wins() {
        let setting = r#"{"db:":"cache:","db:user:":"users:","legacy:":"cache:"}"#;
        assert_eq!(map(setting, "db:user:42").as_deref(), Some("users:42"));
        assert_eq!(map(setting, "db:team:7").as_deref(), Some("cache:team:7"));
        assert_eq!(map(setting, "legacy:x").as_deref(), Some("cache:x"));
        let parsed = KeyMap::parse(setting).unwrap();
        assert_eq!(parsed.cache_prefixes(), ["cache:", "users:"]);
        assert_eq!(parsed.sources(), r#""db:", "db:user:", "legacy:""#);
    }

    #[test]
    fn rejects_malformed_settings_naming_the_setting() {
        let error = |setting: &str| KeyMap::parse(setting).unwrap_err();
        assert!(error("db:").starts_with("setting `key_map` must be a table"));
        assert!(error(r#"["db:"]"#).starts_with("setting `key_map` must be a table"));
        assert_eq!(error("{}"), "setting `key_map` is an empty table");
        assert_eq!(
            error(r#"{"":"cache:"}"#),
            "setting `key_map`: a source prefix is empty (it would match every key)"
        );
        assert_eq!(
            error(r#"{"db:":""}"#),
            r#"setting `key_map`: the cache prefix of "db:" is empty"#
        );
        assert_eq!(
            error(r#"{"db:":1}"#),
            r#"setting `key_map`: the cache prefix of "db:" must be a string, got 1"#
        );
    }
}
