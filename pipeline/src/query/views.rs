//! The SQL views on top of the stored views: the `queries/*.sql` files
//! compiled into the binary, plus the files of an optional `--queries DIR`,
//! which add views or replace a built-in one by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use datafusion::execution::context::SessionContext;

use super::QueryError;
use super::view_name::is_valid_view_name;

include!(concat!(env!("OUT_DIR"), "/builtin_queries.rs"));

/// Where a view's SQL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `queries/<name>.sql` as compiled into the binary.
    BuiltIn,
    /// A file of `--queries DIR`.
    File(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::BuiltIn => f.write_str("the built-in queries/"),
            Origin::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One SQL view to register.
#[derive(Debug, Clone)]
pub struct ViewSql {
    pub name: String,
    pub sql: String,
    pub origin: Origin,
}

/// A file of `--queries DIR` that replaces the built-in view of its name
/// with different SQL (the command line says so on stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub name: String,
    pub path: PathBuf,
}

/// The views to register: every built-in one, and every `<dir>/<name>.sql`
/// (replacing the built-in view of that name), by name. A file with the
/// built-in's very text replaces nothing and is not reported.
pub fn view_sql(
    dir: Option<&Path>,
    stored: &[&str],
) -> Result<(Vec<ViewSql>, Vec<Replaced>), QueryError> {
    let mut views: BTreeMap<String, ViewSql> = BUILTIN_QUERIES
        .iter()
        .map(|(name, sql)| {
            (
                (*name).to_owned(),
                ViewSql {
                    name: (*name).to_owned(),
                    sql: (*sql).to_owned(),
                    origin: Origin::BuiltIn,
                },
            )
        })
        .collect();
    let mut replaced = Vec::new();
    if let Some(dir) = dir {
        let read_dir = |cause| QueryError::ReadQuery {
            path: dir.to_path_buf(),
            cause,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir)? {
            let path = entry.map_err(read_dir)?.path();
            if path.extension().is_some_and(|x| x == "sql") {
                paths.push(path);
            }
        }
        paths.sort();
        for path in paths {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            if !is_valid_view_name(&name) {
                return Err(QueryError::ViewName { path });
            }
            if stored.contains(&name.as_str()) {
                return Err(QueryError::ShadowsStoredView { path, name });
            }
            let sql = std::fs::read_to_string(&path).map_err(|cause| QueryError::ReadQuery {
                path: path.clone(),
                cause,
            })?;
            if let Some(builtin) = views.get(&name)
                && builtin.origin == Origin::BuiltIn
                && builtin.sql.trim() != sql.trim()
            {
                replaced.push(Replaced {
                    name: name.clone(),
                    path: path.clone(),
                });
            }
            views.insert(
                name.clone(),
                ViewSql {
                    name,
                    sql,
                    origin: Origin::File(path),
                },
            );
        }
    }
    Ok((views.into_values().collect(), replaced))
}

/// Registers `views` as SQL views. A view may use another, whatever their
/// names' order: the ones that fail are retried until a round makes no
/// progress, and then the first failure of that round is the error.
pub async fn register(ctx: &SessionContext, views: &[ViewSql]) -> Result<(), QueryError> {
    let mut pending: Vec<&ViewSql> = views.iter().collect();
    loop {
        let mut failed = Vec::new();
        let mut first_err = None;
        for v in &pending {
            let body = v.sql.trim().trim_end_matches(';');
            match ctx
                .sql(&format!("CREATE OR REPLACE VIEW {} AS {body}", v.name))
                .await
            {
                Ok(_) => {}
                Err(cause) => {
                    failed.push(*v);
                    first_err.get_or_insert((*v, cause));
                }
            }
        }
        let Some((view, cause)) = first_err else {
            return Ok(());
        };
        if failed.len() == pending.len() {
            return Err(QueryError::QueryView {
                name: view.name.clone(),
                origin: view.origin.clone(),
                cause,
            });
        }
        pending = failed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queries_file_is_built_in() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .map(|p| p.file_stem().unwrap().to_str().unwrap().to_owned())
            .collect();
        on_disk.sort();
        let built_in: Vec<&str> = BUILTIN_QUERIES.iter().map(|(n, _)| *n).collect();
        assert_eq!(built_in, on_disk);
        for (name, sql) in BUILTIN_QUERIES {
            assert_eq!(
                *sql,
                std::fs::read_to_string(dir.join(format!("{name}.sql"))).unwrap()
            );
        }
    }

    #[test]
    fn a_directory_adds_and_replaces_views_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("churn.sql"), "SELECT 1 AS x").unwrap();
        std::fs::write(dir.path().join("mine.sql"), "SELECT 2 AS y").unwrap();
        let (_, ltv) = BUILTIN_QUERIES.iter().find(|(n, _)| *n == "ltv").unwrap();
        std::fs::write(dir.path().join("ltv.sql"), format!("{ltv}\n")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a view").unwrap();
        let (views, replaced) = view_sql(Some(dir.path()), &["events"]).unwrap();
        let names: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
        let mut expected: Vec<&str> = BUILTIN_QUERIES.iter().map(|(n, _)| *n).collect();
        expected.push("mine");
        expected.sort();
        assert_eq!(names, expected);
        let churn = views.iter().find(|v| v.name == "churn").unwrap();
        assert_eq!(churn.sql, "SELECT 1 AS x");
        assert_eq!(churn.origin, Origin::File(dir.path().join("churn.sql")));
        // Only churn changed: ltv.sql has the built-in text.
        assert_eq!(
            replaced,
            [Replaced {
                name: "churn".into(),
                path: dir.path().join("churn.sql")
            }]
        );
    }

    #[test]
    fn bad_names_missing_directories_and_stored_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(matches!(
            view_sql(Some(&missing), &[]),
            Err(QueryError::ReadQuery { .. })
        ));
        std::fs::write(dir.path().join("events.sql"), "SELECT 1").unwrap();
        assert!(matches!(
            view_sql(Some(dir.path()), &["events"]),
            Err(QueryError::ShadowsStoredView { .. })
        ));
        std::fs::remove_file(dir.path().join("events.sql")).unwrap();
        std::fs::write(dir.path().join("My-View.sql"), "SELECT 1").unwrap();
        assert!(matches!(
            view_sql(Some(dir.path()), &[]),
            Err(QueryError::ViewName { .. })
        ));
    }
}
