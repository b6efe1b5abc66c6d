//! What a `queries/<name>.sql` file may be called. Shared with the build
//! script (`build.rs` includes this file), so the views compiled in and the
//! views read from `--queries DIR` follow one rule.

/// A view name is a plain lower-case SQL identifier (a letter, then letters,
/// digits and `_`), so `CREATE VIEW <name>` needs no quoting and every
/// client spells it the same way.
pub fn is_valid_view_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}
