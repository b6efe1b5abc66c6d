//! A session's named prepared statements and portals: how many it may
//! hold, and the checks Postgres makes on Parse and Bind that pgwire's
//! defaults leave out.
//!
//! pgwire keeps statements and portals in a map without bound, replaces a
//! named statement on a second Parse and binds any number of parameters
//! to any statement. A client that parsed a million named statements
//! would hold them all; one that bound two values to a one-parameter
//! statement would get an answer to a query it did not send. Here, as in
//! Postgres, a named statement must be closed (or `DEALLOCATE`d) before
//! its name is used again (`42P05`), a Bind must supply what the
//! statement takes (`08P01`), and, beyond Postgres, a session holds at
//! most [`MAX_STATEMENTS`] named statements and [`MAX_PORTALS`] named
//! portals (`53000`), and its named statements within its share of the
//! memory limit (`53200`; a statement is counted as
//! [`BYTES_PER_TEXT_BYTE`] times its text), so its memory is bounded like
//! its cursors'.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use pgwire::error::PgWireError;

use super::errors::user_error;

/// Named prepared statements one session may hold at once. Drivers keep
/// far fewer (pgjdbc caches 256, psycopg 100) and close what they evict.
pub const MAX_STATEMENTS: usize = 1024;

/// Named portals one session may hold at once.
pub const MAX_PORTALS: usize = 1024;

/// What a parsed statement holds per byte of its text (its syntax tree
/// and plan schema): a 210 KB statement of 1,000 literal columns held
/// 1.2 MB.
pub const BYTES_PER_TEXT_BYTE: u64 = 8;

/// The names a session holds (the unnamed statement and portal are
/// replaced freely and not counted).
#[derive(Default)]
pub struct Names {
    /// Named statements and what each is counted as holding.
    statements: Mutex<HashMap<String, u64>>,
    portals: Mutex<HashSet<String>>,
}

/// The lock's contents; a poisoned lock still holds correct names.
fn held<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A name the client gave, or `None` for the unnamed statement or portal.
pub fn named(name: Option<&str>) -> Option<&str> {
    name.filter(|n| !n.is_empty())
}

impl Names {
    /// Takes `name` for a statement of `text` bytes: refused if the
    /// session has it already (`42P05`), holds the most it may, or would
    /// hold more than `budget` bytes of statements.
    pub fn add_statement(&self, name: &str, text: usize, budget: u64) -> Result<(), PgWireError> {
        let mut held = held(&self.statements);
        if held.contains_key(name) {
            return Err(user_error(
                "42P05",
                format!(
                    "prepared statement \"{name}\" already exists: close it (DEALLOCATE {name}) first, or use another name"
                ),
            ));
        }
        if held.len() >= MAX_STATEMENTS {
            return Err(user_error(
                "53000",
                format!(
                    "this session holds {MAX_STATEMENTS} named prepared statements, the most it may: close (DEALLOCATE) some first"
                ),
            ));
        }
        let cost = (text as u64).saturating_mul(BYTES_PER_TEXT_BYTE);
        let total = held.values().sum::<u64>().saturating_add(cost);
        if total > budget {
            return Err(user_error(
                "53200",
                format!(
                    "the prepared statements of this session would hold about {} MiB, more than its share of --memory-limit ({} MiB, the limit shared by --max-connections): close (DEALLOCATE) some first",
                    total.div_ceil(1 << 20),
                    budget >> 20
                ),
            ));
        }
        held.insert(name.to_owned(), cost);
        Ok(())
    }

    /// Whether the session holds the statement `name`.
    pub fn has_statement(&self, name: &str) -> bool {
        held(&self.statements).contains_key(name)
    }

    /// Forgets the statement `name`; whether it was held.
    pub fn remove_statement(&self, name: &str) -> bool {
        held(&self.statements).remove(name).is_some()
    }

    /// Forgets every statement, returning their names.
    pub fn take_statements(&self) -> Vec<String> {
        held(&self.statements)
            .drain()
            .map(|(name, _)| name)
            .collect()
    }

    /// Takes `name` for a portal about to be bound (binding an existing
    /// name replaces it): refused when the session holds the most it may.
    pub fn add_portal(&self, name: &str) -> Result<(), PgWireError> {
        let mut held = held(&self.portals);
        if !held.contains(name) && held.len() >= MAX_PORTALS {
            return Err(user_error(
                "53000",
                format!(
                    "this session holds {MAX_PORTALS} named portals, the most it may: close some first"
                ),
            ));
        }
        held.insert(name.to_owned());
        Ok(())
    }

    /// Forgets the portal `name`.
    pub fn remove_portal(&self, name: &str) {
        held(&self.portals).remove(name);
    }

    /// Forgets every bound portal, returning their names.
    pub fn take_portals(&self) -> Vec<String> {
        held(&self.portals).drain().collect()
    }
}

/// What a Bind supplies against what its statement takes: `params`
/// values with `formats` format codes (none: all text; one: for all;
/// else one each), and `results` result format codes for `columns`
/// columns. Postgres's rules and messages.
pub fn check_bind(
    statement: &str,
    takes: usize,
    params: usize,
    formats: &[i16],
    results: &[i16],
    columns: Option<usize>,
) -> Result<(), PgWireError> {
    if params != takes {
        return Err(user_error(
            "08P01",
            format!(
                "bind message supplies {params} parameters, but prepared statement \"{statement}\" requires {takes}"
            ),
        ));
    }
    if formats.len() > 1 && formats.len() != params {
        return Err(user_error(
            "08P01",
            format!(
                "bind message has {} parameter formats but {params} parameters",
                formats.len()
            ),
        ));
    }
    if let Some(columns) = columns
        && results.len() > 1
        && results.len() != columns
    {
        return Err(user_error(
            "08P01",
            format!(
                "bind message has {} result formats but query has {columns} columns",
                results.len()
            ),
        ));
    }
    if let Some(code) = formats.iter().chain(results).find(|c| !matches!(c, 0 | 1)) {
        return Err(user_error(
            "22023",
            format!("unsupported format code: {code} (0 is text, 1 is binary)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<(), PgWireError>) -> String {
        match r {
            Ok(()) => "ok".into(),
            Err(PgWireError::UserError(info)) => info.code,
            Err(other) => format!("{other}"),
        }
    }

    #[test]
    fn a_named_statement_is_taken_once_until_removed() {
        let names = Names::default();
        assert_eq!(code(names.add_statement("s1", 8, u64::MAX)), "ok");
        assert_eq!(code(names.add_statement("s1", 8, u64::MAX)), "42P05");
        assert!(names.remove_statement("s1"));
        assert!(!names.remove_statement("s1"));
        assert_eq!(code(names.add_statement("s1", 8, u64::MAX)), "ok");
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_names() {
        let names = Names::default();
        for i in 0..MAX_STATEMENTS {
            assert_eq!(
                code(names.add_statement(&format!("s{i}"), 8, u64::MAX)),
                "ok"
            );
            assert_eq!(code(names.add_portal(&format!("p{i}"))), "ok");
        }
        assert_eq!(code(names.add_statement("one more", 8, u64::MAX)), "53000");
        assert_eq!(code(names.add_portal("one more")), "53000");
        // Binding a held portal again replaces it.
        assert_eq!(code(names.add_portal("p0")), "ok");
        assert_eq!(names.take_statements().len(), MAX_STATEMENTS);
        assert_eq!(code(names.add_statement("one more", 8, u64::MAX)), "ok");
    }

    #[test]
    fn a_sessions_statements_stay_within_its_budget() {
        let names = Names::default();
        let budget = 1 << 20;
        let text = 40_000; // counted as 320,000 bytes
        for i in 0..3 {
            assert_eq!(
                code(names.add_statement(&format!("s{i}"), text, budget)),
                "ok"
            );
        }
        assert_eq!(code(names.add_statement("s3", text, budget)), "53200");
        assert!(names.remove_statement("s0"));
        assert_eq!(code(names.add_statement("s3", text, budget)), "ok");
    }

    #[test]
    fn a_bind_supplies_what_its_statement_takes() {
        assert_eq!(code(check_bind("s", 1, 1, &[], &[], Some(3))), "ok");
        assert_eq!(code(check_bind("s", 2, 2, &[1], &[0], Some(3))), "ok");
        assert_eq!(
            code(check_bind("s", 2, 2, &[0, 1], &[0, 1, 1], Some(3))),
            "ok"
        );
        assert_eq!(code(check_bind("s", 1, 2, &[], &[], Some(3))), "08P01");
        assert_eq!(code(check_bind("s", 2, 1, &[], &[], Some(3))), "08P01");
        assert_eq!(code(check_bind("s", 2, 2, &[0, 1, 0], &[], None)), "08P01");
        assert_eq!(code(check_bind("s", 0, 0, &[], &[0, 1], Some(3))), "08P01");
        assert_eq!(code(check_bind("s", 1, 1, &[7], &[], None)), "22023");
        assert_eq!(code(check_bind("s", 0, 0, &[], &[-1], Some(1))), "22023");
    }
}
