//! Statements as Tally answers them: each parsed statement sorted into a
//! [`Kind`] (queries, `COPY (query) TO STDOUT`, harmless `SET`s, `SHOW`,
//! transactions, cursors, refused), and the extended protocol's parser,
//! which plans at Parse to describe parameters and columns.

use std::fmt::Debug;
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, DiscardObject, Set,
    Statement,
};
use datafusion_postgres::arrow_pg::datatypes::{arrow_schema_to_pg_fields, into_pg_type};
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use pgwire::api::portal::Format;
use pgwire::api::results::FieldInfo;
use pgwire::api::stmt::QueryParser;
use pgwire::api::{ClientInfo, Type};
use pgwire::error::PgWireResult;

use super::errors::{query_error, user_error};
use super::startup::{Login, scope_of};
use crate::serve::Shared;
use crate::serve::postgres::setting;

/// Session settings clients send on connect; `SET` of any other is refused.
pub(super) const HARMLESS_SETTINGS: &[&str] = &[
    "datestyle",
    "client_encoding",
    "extra_float_digits",
    "application_name",
    "search_path",
    "timezone",
];

/// A statement as Tally answers it.
#[derive(Debug, Clone)]
pub enum Kind {
    Query(Box<Statement>),
    /// `COPY (query) TO STDOUT`.
    Copy {
        query: Box<Statement>,
        csv: bool,
        header: bool,
        delimiter: char,
    },
    /// A harmless `SET`: acknowledged, changes nothing.
    Set,
    Show(String),
    Begin,
    /// `DECLARE name CURSOR FOR query`: the query runs at once and its rows
    /// wait in the connection for `FETCH`.
    Declare {
        name: String,
        query: Box<Statement>,
    },
    /// `FETCH [FORWARD] n|ALL FROM name`; `None` is all.
    Fetch {
        name: String,
        count: Option<usize>,
    },
    /// `CLOSE name`, or `CLOSE ALL` (`None`).
    Close(Option<String>),
    /// `DEALLOCATE [PREPARE] name`, or `DEALLOCATE ALL` (`None`): the
    /// session's named prepared statement(s).
    Deallocate(Option<String>),
    /// `DISCARD ALL`: the session's prepared statements, portals and
    /// cursors. (`DISCARD PLANS` and the others change nothing here.)
    Discard,
    /// `COMMIT`, `ROLLBACK`, `END`, `ABORT`.
    End(&'static str),
    Refused(String),
    /// A read Tally does not offer (`0A000`), with what to do instead.
    Unsupported(String),
}

/// Sorts one parsed statement.
pub fn classify(statement: Statement) -> Kind {
    match statement {
        Statement::Set(set) => match set {
            Set::SingleAssignment { variable, .. } => {
                let name = variable.to_string().to_ascii_lowercase();
                let bare = name.rsplit('.').next().unwrap_or(&name).to_owned();
                if HARMLESS_SETTINGS.contains(&bare.as_str()) && !name.starts_with("datafusion") {
                    Kind::Set
                } else {
                    Kind::Refused(format!("SET {name}"))
                }
            }
            Set::SetTimeZone { .. } | Set::SetNames { .. } | Set::SetNamesDefault { .. } => {
                Kind::Set
            }
            other => Kind::Refused(format!("{other}")),
        },
        Statement::ShowVariable { variable } => {
            let words: Vec<&str> = variable.iter().map(|i| i.value.as_str()).collect();
            // `SHOW transaction isolation level` is words; any other
            // setting of several parts is a dotted name.
            let spaced = words.join(" ");
            Kind::Show(if setting(&spaced).is_some() {
                spaced
            } else {
                words.join(".")
            })
        }
        Statement::StartTransaction { .. } => Kind::Begin,
        Statement::Commit { .. } => Kind::End("COMMIT"),
        Statement::Rollback { .. } => Kind::End("ROLLBACK"),
        Statement::Copy {
            source: CopySource::Query(query),
            to: true,
            target: CopyTarget::Stdout,
            options,
            legacy_options,
            ..
        } => {
            let mut csv = false;
            let mut header = false;
            let mut delimiter = None;
            for o in &options {
                match o {
                    CopyOption::Format(f) => {
                        if f.value.eq_ignore_ascii_case("csv") {
                            csv = true;
                        } else if f.value.eq_ignore_ascii_case("text") {
                            csv = false;
                        } else {
                            return Kind::Unsupported(format!(
                                "COPY FORMAT {} is not supported: use FORMAT text (the default) or FORMAT csv",
                                f.value
                            ));
                        }
                    }
                    CopyOption::Header(h) => header = *h,
                    CopyOption::Delimiter(d) => delimiter = Some(*d),
                    other => return Kind::Refused(format!("COPY option {other}")),
                }
            }
            for o in &legacy_options {
                match o {
                    CopyLegacyOption::Csv(opts) => {
                        csv = true;
                        for c in opts {
                            match c {
                                CopyLegacyCsvOption::Header => header = true,
                                other => return Kind::Refused(format!("COPY option {other}")),
                            }
                        }
                    }
                    CopyLegacyOption::Delimiter(d) => delimiter = Some(*d),
                    other => return Kind::Refused(format!("COPY option {other}")),
                }
            }
            Kind::Copy {
                query: Box::new(Statement::Query(query)),
                csv,
                header,
                delimiter: delimiter.unwrap_or(if csv { ',' } else { '\t' }),
            }
        }
        Statement::Copy { .. } => Kind::Refused(
            "COPY other than COPY (query) TO STDOUT (use psql's \\copy (SELECT ...) TO 'file')"
                .into(),
        ),
        Statement::Discard {
            object_type: DiscardObject::ALL,
        } => Kind::Discard,
        Statement::Discard { .. } => Kind::Set,
        Statement::Deallocate { name, .. } => {
            if name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all") {
                Kind::Deallocate(None)
            } else {
                Kind::Deallocate(Some(name.value))
            }
        }
        Statement::Declare { stmts } => match stmts.as_slice() {
            [d] if d.names.len() == 1 => match &d.for_query {
                Some(q) => Kind::Declare {
                    name: d.names[0].value.clone(),
                    query: Box::new(Statement::Query(q.clone())),
                },
                None => Kind::Refused("DECLARE without FOR query".into()),
            },
            _ => Kind::Refused("DECLARE other than one cursor for a query".into()),
        },
        Statement::Fetch {
            name,
            direction,
            into: None,
            ..
        } => {
            use datafusion::sql::sqlparser::ast::{FetchDirection as F, Value};
            let number = |v: &datafusion::sql::sqlparser::ast::ValueWithSpan| match &v.value {
                Value::Number(n, _) => n.parse::<usize>().ok(),
                _ => None,
            };
            let count = match &direction {
                F::Next | F::Forward { limit: None } => Some(Some(1)),
                F::Count { limit } | F::Forward { limit: Some(limit) } => number(limit).map(Some),
                F::All | F::ForwardAll => Some(None),
                _ => None,
            };
            match count {
                Some(count) => Kind::Fetch {
                    name: name.value.clone(),
                    count,
                },
                None => Kind::Refused(format!("FETCH {direction} (cursors go forward only)")),
            }
        }
        Statement::Close { cursor } => match cursor {
            datafusion::sql::sqlparser::ast::CloseCursor::All => Kind::Close(None),
            datafusion::sql::sqlparser::ast::CloseCursor::Specific { name } => {
                Kind::Close(Some(name.value))
            }
        },
        other => Kind::Query(Box::new(other)),
    }
}

/// A statement of the extended protocol, parsed once.
#[derive(Debug)]
pub struct Prepared {
    pub kind: Kind,
    /// Parameter types as planned (`$1` first).
    pub params: Vec<DataType>,
    /// Result columns as planned; `None` for statements without rows.
    pub schema: Option<SchemaRef>,
}

/// The extended protocol's parser: plans on the checkpoint current at Parse
/// time to describe parameters and columns; Execute plans again on the
/// checkpoint current then.
pub struct Parser {
    pub(super) shared: Arc<Shared>,
    pub(super) login: Login,
    pub(super) sql: PostgresCompatibilityParser,
}

/// The subquery with which Grafana's Postgres datasource lists the schemas
/// on the `search_path` (its table list and column browser use it). It
/// reads a table function DataFusion lacks; the search path is always
/// `public` here, so it becomes that.
const GRAFANA_SEARCH_PATH: &str = "SELECT CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END FROM generate_series( array_lower(string_to_array(current_setting('search_path'),','),1), array_upper(string_to_array(current_setting('search_path'),','),1) ) as i, string_to_array(current_setting('search_path'),',') s";

pub(super) fn collapse_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `sql` with Grafana's search-path subquery answered (see
/// [`GRAFANA_SEARCH_PATH`]).
pub fn known_client_rewrites(sql: &str) -> std::borrow::Cow<'_, str> {
    if !sql.contains("string_to_array(current_setting('search_path')") {
        return std::borrow::Cow::Borrowed(sql);
    }
    let pattern = collapse_whitespace(GRAFANA_SEARCH_PATH)
        .replace("( ", "(")
        .replace(" )", ")");
    let text = collapse_whitespace(sql)
        .replace("( ", "(")
        .replace(" )", ")");
    if text.contains(&pattern) {
        std::borrow::Cow::Owned(text.replace(&pattern, "SELECT 'public'"))
    } else {
        std::borrow::Cow::Borrowed(sql)
    }
}

impl Parser {
    /// Plans `statement` on the checkpoint current now, for the account.
    async fn plan_now(&self, statement: &Statement) -> PgWireResult<LogicalPlan> {
        let scope = scope_of(&self.shared, &self.login)?;
        self.shared
            .views
            .plan(&scope, statement)
            .await
            .map_err(|e| query_error(&e))
    }

    pub(super) fn parse_all(&self, sql: &str) -> PgWireResult<Vec<Statement>> {
        if sql.len() > crate::serve::MAX_QUERY_BYTES {
            return Err(user_error(
                "54000",
                format!(
                    "the query is {} bytes; at most {} are accepted: split it or use IN lists instead of long chains",
                    sql.len(),
                    crate::serve::MAX_QUERY_BYTES
                ),
            ));
        }
        crate::query::guard::check_text(sql).map_err(|e| query_error(&e))?;
        let sql = known_client_rewrites(sql);
        self.sql
            .parse(&sql)
            .map_err(|e| user_error("42601", format!("syntax error: {e}")))
    }
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Arc<Prepared>;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Arc<Prepared>>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = self.parse_all(sql)?;
        if statements.len() > 1 {
            return Err(user_error(
                "42601",
                "cannot insert multiple commands into a prepared statement",
            ));
        }
        let Some(statement) = statements.pop() else {
            return Ok(None);
        };
        let kind = classify(statement);
        let (params, schema) = match &kind {
            Kind::Query(s) | Kind::Copy { query: s, .. } => {
                let plan = self.plan_now(s).await?;
                let params = param_types(&plan)?;
                let schema =
                    matches!(kind, Kind::Query(_)).then(|| Arc::clone(plan.schema().inner()));
                (params, schema)
            }
            Kind::Show(name) => (vec![], Some(show_schema(name))),
            Kind::Declare { query, .. } => (param_types(&self.plan_now(query).await?)?, None),
            _ => (vec![], None),
        };
        Ok(Some(Arc::new(Prepared {
            kind,
            params,
            schema,
        })))
    }

    fn get_parameter_types(&self, stmt: &Arc<Prepared>) -> PgWireResult<Vec<Type>> {
        stmt.params.iter().map(into_pg_type).collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Arc<Prepared>,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match &stmt.schema {
            Some(s) => {
                arrow_schema_to_pg_fields(s, column_format.unwrap_or(&Format::UnifiedText), None)
            }
            None => Ok(vec![]),
        }
    }
}

/// `$1`, `$2`, ... in order, with their inferred types (text where the
/// planner cannot tell).
pub(super) fn param_types(plan: &LogicalPlan) -> PgWireResult<Vec<DataType>> {
    let types = plan
        .get_parameter_types()
        .map_err(|e| user_error("42P18", format!("cannot infer parameter types: {e}")))?;
    let mut numbered: Vec<(usize, DataType)> = types
        .into_iter()
        .filter_map(|(name, t)| {
            let n = name.trim_start_matches('$').parse::<usize>().ok()?;
            Some((n, t.unwrap_or(DataType::Utf8)))
        })
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    Ok(numbered.into_iter().map(|(_, t)| t).collect())
}

pub(super) fn show_schema(name: &str) -> SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new(
            name.to_ascii_lowercase().replace(' ', "_"),
            DataType::Utf8,
            false,
        ),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;

    fn kind(sql: &str) -> Kind {
        classify(
            PostgresCompatibilityParser::new()
                .parse(sql)
                .unwrap()
                .remove(0),
        )
    }

    #[test]
    fn grafanas_search_path_subquery_becomes_public() {
        let grafana = "SELECT quote_ident(column_name) FROM information_schema.columns WHERE quote_ident(table_schema) IN (\n  SELECT\n    CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END\n  FROM\n    generate_series(\n      array_lower(string_to_array(current_setting('search_path'),','),1),\n      array_upper(string_to_array(current_setting('search_path'),','),1)\n    ) as i,\n    string_to_array(current_setting('search_path'),',') s\n  )";
        let out = known_client_rewrites(grafana);
        assert!(out.ends_with("IN (SELECT 'public')"), "{out}");
        assert_eq!(known_client_rewrites("SELECT  1"), "SELECT  1");
    }

    #[test]
    fn statements_are_sorted() {
        assert!(matches!(kind("SELECT 1"), Kind::Query(_)));
        assert!(matches!(kind("SET application_name = 'x'"), Kind::Set));
        assert!(matches!(kind("SET DateStyle TO ISO"), Kind::Set));
        assert!(matches!(kind("SET TIME ZONE 'UTC'"), Kind::Set));
        assert!(matches!(
            kind("SET datafusion.execution.batch_size = 1"),
            Kind::Refused(_)
        ));
        assert!(matches!(kind("SET work_mem = '1GB'"), Kind::Refused(_)));
        assert!(matches!(kind("BEGIN"), Kind::Begin));
        assert!(matches!(kind("COMMIT"), Kind::End("COMMIT")));
        assert!(matches!(kind("SHOW TimeZone"), Kind::Show(_)));
        assert!(matches!(
            kind("COPY (SELECT 1) TO STDOUT WITH (FORMAT csv, HEADER)"),
            Kind::Copy {
                csv: true,
                header: true,
                delimiter: ',',
                ..
            }
        ));
        assert!(matches!(
            kind("COPY ( SELECT 1 ) TO STDOUT CSV HEADER"),
            Kind::Copy {
                csv: true,
                header: true,
                ..
            }
        ));
        assert!(matches!(kind("COPY usage FROM STDIN"), Kind::Refused(_)));
        assert!(matches!(kind("COPY usage TO '/tmp/x'"), Kind::Refused(_)));
        assert!(matches!(
            kind("INSERT INTO usage VALUES (1)"),
            Kind::Query(_)
        ));
    }
}
