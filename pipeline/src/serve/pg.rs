//! The Postgres wire protocol (v3) front of `tally serve`, on pgwire.
//!
//! Each connection gets its own handlers ([`Connection`]): SCRAM-SHA-256
//! against the users file at startup, then simple and extended queries
//! answered from [`Views`] for the account's scope. Statements are parsed
//! with datafusion-postgres's Postgres-dialect parser (which also rewrites
//! what psql and drivers send to `pg_catalog`), sorted into what Tally
//! answers itself (harmless `SET`s, `SHOW`, transaction statements,
//! `COPY (query) TO STDOUT`) and queries, which go through the same
//! read-only guard as `tally sql`. Decimals are sent with every digit
//! ([`numeric`]); everything else is encoded by arrow-pg.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions as ArrowFormat};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Set, Statement,
};
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters_with_server_types;
use datafusion_postgres::arrow_pg::datatypes::{arrow_schema_to_pg_fields, into_pg_type};
use datafusion_postgres::arrow_pg::encoder::encode_value;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use futures::{Sink, SinkExt, stream};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{CopyResponse, DataRowEncoder, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::stmt::StoredStatement;
use pgwire::api::store::{MemPortalStore, PortalStore};
use pgwire::api::{
    ClientInfo, ClientPortalStore, ErrorHandler, METADATA_DATABASE, METADATA_USER,
    PgWireConnectionState, PgWireServerHandlers, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::copy::CopyData;
use pgwire::messages::data::DataRow;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::types::format::FormatOptions;

use super::Shared;
use super::accounts::ScopeCheck;
use super::metrics::Protocol;
use super::numeric::Numeric;
use super::postgres::{SERVER_VERSION, setting};
use super::scram::{Exchange, ScramError};
use super::views::Answer;
use crate::query::{QueryError, Scope};

/// The only database: another name is refused with `3D000`.
pub const DATABASE: &str = "tally";

/// Session settings clients send on connect; `SET` of any other is refused.
const HARMLESS_SETTINGS: &[&str] = &[
    "datestyle",
    "client_encoding",
    "extra_float_digits",
    "application_name",
    "search_path",
    "timezone",
];

/// The account's tenants changed (or it was removed) while rows computed
/// for its former scope were still to be sent.
fn scope_changed() -> PgWireError {
    user_error(
        "42501",
        "the account's tenants changed since these rows were computed; run the query (or DECLARE the cursor) again",
    )
}

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

fn fatal(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message.into(),
    )))
}

/// The SQLSTATE of a query failure.
pub fn sqlstate(e: &QueryError) -> &'static str {
    use datafusion::error::DataFusionError as D;
    match e {
        QueryError::ReadOnly { .. } => "42501",
        QueryError::TooDeep { .. }
        | QueryError::ExpressionTooDeep
        | QueryError::PlanTooLarge { .. } => "54001",
        QueryError::MemoryLimit { .. } | QueryError::OverBudget(_) => "53200",
        QueryError::Timeout { .. } => "57014",
        QueryError::Execute(d) => match d.find_root() {
            D::SQL(..) => "42601",
            D::SchemaError(s, _) => match **s {
                datafusion::common::SchemaError::FieldNotFound { .. } => "42703",
                _ => "42P01",
            },
            D::Plan(m) if m.contains("table") && m.contains("not found") => "42P01",
            D::Plan(_) | D::NotImplemented(_) => "42000",
            D::ArrowError(..) | D::Execution(_) => "22000",
            _ => "XX000",
        },
        QueryError::FileGone { .. } | QueryError::Unsettled { .. } => "40001",
        QueryError::NoViews { .. } | QueryError::NoPartition { .. } => "55000",
        _ => "XX000",
    }
}

fn query_error(e: &QueryError) -> PgWireError {
    user_error(sqlstate(e), e.to_string())
}

/// A statement as Tally answers it.
#[derive(Debug, Clone)]
pub enum Kind {
    Empty,
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
    /// `COMMIT`, `ROLLBACK`, `END`, `ABORT`.
    End(&'static str),
    Refused(String),
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
        Statement::ShowVariable { variable } => Kind::Show(
            variable
                .iter()
                .map(|i| i.value.clone())
                .collect::<Vec<_>>()
                .join(" "),
        ),
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
                    CopyOption::Format(f) => csv = f.value.eq_ignore_ascii_case("csv"),
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
        Statement::Discard { .. } | Statement::Deallocate { .. } => Kind::Set,
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

/// The login of a connection, once SCRAM succeeded.
type Login = Arc<Mutex<Option<String>>>;

fn login_user(login: &Login) -> Option<String> {
    match login.lock() {
        Ok(l) => l.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// The scope of the connection's account now; a removed account ends the
/// session.
fn scope_of(shared: &Shared, login: &Login) -> PgWireResult<Scope> {
    let user = login_user(login).ok_or_else(|| fatal("28000", "not authenticated"))?;
    match shared.accounts.account(&user) {
        Some(a) => Ok(a.scope()),
        None => Err(fatal(
            "28000",
            format!("account {user} was removed from the users file; the session ends"),
        )),
    }
}

/// What one connection holds.
pub struct Connection {
    shared: Arc<Shared>,
    login: Login,
    /// Notified when a FATAL error goes to the client: the session is over
    /// even if the client keeps its socket open.
    pub ended: Arc<tokio::sync::Notify>,
    /// Open cursors: the rows still to fetch.
    cursors: tokio::sync::Mutex<std::collections::HashMap<String, Cursor>>,
    auth: tokio::sync::Mutex<AuthState>,
    parser: Arc<Parser>,
}

/// A declared cursor's rows, fetched from the front.
struct Cursor {
    schema: SchemaRef,
    batches: std::collections::VecDeque<RecordBatch>,
    /// The scope its rows were computed for: a fetch after the account
    /// changed is refused (the rows may hold tenants it no longer sees).
    scope: Scope,
}

impl Cursor {
    /// Takes up to `count` rows (all if `None`).
    fn take(&mut self, count: Option<usize>) -> Vec<RecordBatch> {
        let mut left = count.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        while left > 0 {
            let Some(batch) = self.batches.pop_front() else {
                break;
            };
            if batch.num_rows() <= left {
                left -= batch.num_rows();
                out.push(batch);
            } else {
                out.push(batch.slice(0, left));
                self.batches
                    .push_front(batch.slice(left, batch.num_rows() - left));
                left = 0;
            }
        }
        out
    }
}

enum AuthState {
    Initial,
    Waiting(Box<Exchange>),
    Done,
}

impl Connection {
    /// Whether SCRAM has succeeded on this connection.
    pub fn logged_in(&self) -> bool {
        login_user(&self.login).is_some()
    }

    pub fn new(shared: Arc<Shared>) -> Connection {
        let login: Login = Arc::new(Mutex::new(None));
        Connection {
            parser: Arc::new(Parser {
                shared: Arc::clone(&shared),
                login: Arc::clone(&login),
                sql: PostgresCompatibilityParser::new(),
            }),
            shared,
            login,
            ended: Arc::new(tokio::sync::Notify::new()),
            cursors: tokio::sync::Mutex::new(std::collections::HashMap::new()),
            auth: tokio::sync::Mutex::new(AuthState::Initial),
        }
    }
}

/// pgwire's handler set for one connection.
pub struct Handlers(pub Arc<Connection>);

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.0)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.0)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.0)
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LogErrors {
            ended: Arc::clone(&self.0.ended),
        })
    }
}

struct LogErrors {
    ended: Arc<tokio::sync::Notify>,
}

impl ErrorHandler for LogErrors {
    fn on_error<C: ClientInfo>(&self, client: &C, error: &mut PgWireError) {
        tracing::debug!(peer = %client.socket_addr(), error = %error, "pgwire error sent");
        if let PgWireError::UserError(info) = error
            && info.severity == "FATAL"
        {
            self.ended.notify_one();
        }
    }
}

fn parameters() -> DefaultServerParameterProvider {
    let mut p = DefaultServerParameterProvider::default();
    p.server_version = SERVER_VERSION.into();
    p.is_superuser = false;
    p.default_transaction_read_only = true;
    p.time_zone = "UTC".into();
    p
}

#[async_trait]
impl StartupHandler for Connection {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if !client.metadata().contains_key(METADATA_USER) {
                    return Err(fatal(
                        "28000",
                        "no user name in the startup packet; connect with a user (psql -U NAME)",
                    ));
                }
                let database = client
                    .metadata()
                    .get(METADATA_DATABASE)
                    .cloned()
                    .unwrap_or_else(|| DATABASE.into());
                if database != DATABASE {
                    return Err(fatal(
                        "3D000",
                        format!(
                            "database \"{database}\" does not exist; the database is named {DATABASE}"
                        ),
                    ));
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(Authentication::SASL(
                        vec!["SCRAM-SHA-256".into()],
                    )))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(msg) => {
                let user = client
                    .metadata()
                    .get(METADATA_USER)
                    .cloned()
                    .unwrap_or_default();
                let mut state = self.auth.lock().await;
                match std::mem::replace(&mut *state, AuthState::Done) {
                    AuthState::Initial => {
                        let first = msg.into_sasl_initial_response()?;
                        if first.auth_method != "SCRAM-SHA-256" {
                            return Err(fatal(
                                "28000",
                                format!(
                                    "SASL mechanism {} is not offered; use SCRAM-SHA-256",
                                    first.auth_method
                                ),
                            ));
                        }
                        let data = first.data.unwrap_or_default();
                        let text = std::str::from_utf8(&data)
                            .map_err(|_| fatal("08P01", "SCRAM message is not UTF-8"))?;
                        let verifier = self
                            .shared
                            .accounts
                            .account(&user)
                            .and_then(|a| super::accounts::Verifier::parse(&a.verifier));
                        let mut nonce = [0u8; 18];
                        getrandom::fill(&mut nonce)
                            .map_err(|e| fatal("XX000", format!("no random nonce: {e}")))?;
                        let (exchange, server_first) = Exchange::start(
                            text,
                            verifier,
                            &user,
                            &self.shared.accounts.get().mock_salt_secret(),
                            &nonce,
                        )
                        .map_err(|e| scram_failed(&user, client.socket_addr(), e))?;
                        *state = AuthState::Waiting(Box::new(exchange));
                        client
                            .send(PgWireBackendMessage::Authentication(
                                Authentication::SASLContinue(Bytes::from(server_first)),
                            ))
                            .await?;
                    }
                    AuthState::Waiting(exchange) => {
                        let resp = msg.into_sasl_response()?;
                        let text = std::str::from_utf8(&resp.data)
                            .map_err(|_| fatal("08P01", "SCRAM message is not UTF-8"))?;
                        let server_final = exchange
                            .finish(text)
                            .map_err(|e| scram_failed(&user, client.socket_addr(), e))?;
                        client
                            .send(PgWireBackendMessage::Authentication(
                                Authentication::SASLFinal(Bytes::from(server_final)),
                            ))
                            .await?;
                        if let Ok(mut l) = self.login.lock() {
                            *l = Some(user.clone());
                        }
                        tracing::debug!(user = %user, peer = %client.socket_addr(), "pgwire login");
                        finish_authentication(client, &parameters()).await?;
                    }
                    AuthState::Done => {
                        return Err(fatal("08P01", "unexpected password message"));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn scram_failed(user: &str, peer: std::net::SocketAddr, e: ScramError) -> PgWireError {
    tracing::warn!(user = %user, peer = %peer, reason = %e, "pgwire login refused");
    match e {
        ScramError::Failed => fatal(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        ),
        other => fatal("28000", other.to_string()),
    }
}

/// The extended protocol's parser: plans on the checkpoint current at Parse
/// time to describe parameters and columns; Execute plans again on the
/// checkpoint current then.
pub struct Parser {
    shared: Arc<Shared>,
    login: Login,
    sql: PostgresCompatibilityParser,
}

/// The subquery with which Grafana's Postgres datasource lists the schemas
/// on the `search_path` (its table list and column browser use it). It
/// reads a table function DataFusion lacks; the search path is always
/// `public` here, so it becomes that.
const GRAFANA_SEARCH_PATH: &str = "SELECT CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END FROM generate_series( array_lower(string_to_array(current_setting('search_path'),','),1), array_upper(string_to_array(current_setting('search_path'),','),1) ) as i, string_to_array(current_setting('search_path'),',') s";

fn collapse_whitespace(s: &str) -> String {
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

    fn parse_all(&self, sql: &str) -> PgWireResult<Vec<Statement>> {
        if sql.len() > super::MAX_QUERY_BYTES {
            return Err(user_error(
                "54000",
                format!(
                    "the query is {} bytes; at most {} are accepted: split it or use IN lists instead of long chains",
                    sql.len(),
                    super::MAX_QUERY_BYTES
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
fn param_types(plan: &LogicalPlan) -> PgWireResult<Vec<DataType>> {
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

fn show_schema(name: &str) -> SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new(
            name.to_ascii_lowercase().replace(' ', "_"),
            DataType::Utf8,
            false,
        ),
    ]))
}

impl Connection {
    /// Answers one statement; `bind` binds the extended protocol's
    /// parameters to the plan.
    async fn answer<C, F>(
        &self,
        client: &C,
        kind: &Kind,
        format: &Format,
        bind: F,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore,
        C::PortalStore: PortalStore,
        F: Fn(LogicalPlan) -> Result<LogicalPlan, QueryError> + Send + 'static,
    {
        // A removed account's session ends at its next statement, whatever it is.
        let scope = scope_of(&self.shared, &self.login)?;
        match kind {
            Kind::Empty => Ok(Response::EmptyQuery),
            Kind::Set => Ok(Response::Execution(Tag::new("SET"))),
            Kind::Begin => Ok(Response::TransactionStart(Tag::new("BEGIN"))),
            Kind::End(tag) => Ok(Response::TransactionEnd(Tag::new(tag))),
            Kind::Refused(what) => {
                self.shared.metrics.failed(Protocol::Pg);
                Err(user_error(
                    "42501",
                    format!(
                        "refused: tally serve is read-only ({what} is not allowed); only queries over the views are"
                    ),
                ))
            }
            Kind::Show(name) => {
                let value = setting(name).ok_or_else(|| {
                    user_error(
                        "42704",
                        format!("unrecognized configuration parameter \"{name}\""),
                    )
                })?;
                let fields = Arc::new(arrow_schema_to_pg_fields(&show_schema(name), format, None)?);
                let mut enc = DataRowEncoder::new(Arc::clone(&fields));
                enc.encode_field(&Some(value))?;
                let row = enc.take_row();
                Ok(Response::Query(QueryResponse::new(
                    fields,
                    stream::iter(vec![Ok(row)]),
                )))
            }
            Kind::Query(statement) => {
                let answer = self.run(&scope, statement, bind).await?;
                let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                let fields = Arc::new(arrow_schema_to_pg_fields(
                    &answer.schema,
                    format,
                    Some(options),
                )?);
                let rows = encode_rows(&fields, &answer.batches)?;
                Ok(Response::Query(QueryResponse::new(
                    fields,
                    self.checked_rows(scope, rows),
                )))
            }
            Kind::Declare { name, query } => {
                let answer = self.run(&scope, query, bind).await?;
                // A cursor is a portal too: drivers describe it by name
                // (psycopg's server-side cursors do) before fetching.
                if let Some(store) = client
                    .portal_store()
                    .as_any()
                    .downcast_ref::<MemPortalStore<Arc<Prepared>>>()
                {
                    let prepared = Prepared {
                        kind: Kind::Fetch {
                            name: name.clone(),
                            count: None,
                        },
                        params: vec![],
                        schema: Some(Arc::clone(&answer.schema)),
                    };
                    store.put_portal(Arc::new(Portal::new_cursor(
                        name.clone(),
                        Arc::new(StoredStatement::new(
                            name.clone(),
                            Arc::new(prepared),
                            vec![],
                        )),
                    )));
                }
                let cursor = Cursor {
                    schema: answer.schema,
                    batches: answer.batches.into(),
                    scope,
                };
                self.cursors.lock().await.insert(name.clone(), cursor);
                Ok(Response::Execution(Tag::new("DECLARE CURSOR")))
            }
            Kind::Fetch { name, count } => {
                let mut cursors = self.cursors.lock().await;
                let cursor = cursors.get_mut(name).ok_or_else(|| {
                    user_error("34000", format!("cursor \"{name}\" does not exist"))
                })?;
                if cursor.scope != scope {
                    cursors.remove(name);
                    return Err(scope_changed());
                }
                let batches = cursor.take(*count);
                let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                let fields = Arc::new(arrow_schema_to_pg_fields(
                    &cursor.schema,
                    format,
                    Some(options),
                )?);
                let rows = encode_rows(&fields, &batches)?;
                let mut response = QueryResponse::new(fields, self.checked_rows(scope, rows));
                response.set_command_tag("FETCH");
                Ok(Response::Query(response))
            }
            Kind::Close(name) => {
                let mut cursors = self.cursors.lock().await;
                let store = client
                    .portal_store()
                    .as_any()
                    .downcast_ref::<MemPortalStore<Arc<Prepared>>>();
                match name {
                    None => {
                        if let Some(store) = store {
                            for n in cursors.keys() {
                                store.rm_portal(n);
                            }
                        }
                        cursors.clear()
                    }
                    Some(n) => {
                        if let Some(store) = store {
                            store.rm_portal(n);
                        }
                        cursors.remove(n).ok_or_else(|| {
                            user_error("34000", format!("cursor \"{n}\" does not exist"))
                        })?;
                    }
                }
                Ok(Response::Execution(Tag::new("CLOSE CURSOR")))
            }
            Kind::Copy {
                query,
                csv,
                header,
                delimiter,
            } => {
                let answer = self.run(&scope, query, bind).await?;
                let lines = copy_lines(&answer, *csv, *header, *delimiter)
                    .map_err(|e| user_error("22000", e))?;
                let columns = answer.schema.fields().len();
                Ok(Response::CopyOut(CopyResponse::new(
                    0,
                    columns,
                    stream::iter(lines.into_iter().map(|l| Ok(CopyData::new(Bytes::from(l))))),
                )))
            }
        }
    }

    /// Rows for the client that stop, with an error, at the first one
    /// after the account lost the scope they were computed for: a
    /// suspended portal hands out its rows over several Execute messages.
    fn checked_rows(
        &self,
        scope: Scope,
        rows: Vec<DataRow>,
    ) -> impl futures::Stream<Item = PgWireResult<DataRow>> + Send + use<> {
        let user = login_user(&self.login).unwrap_or_default();
        let mut check = ScopeCheck::new(Arc::clone(&self.shared.accounts), user, scope);
        let mut allowed = true;
        stream::iter(rows.into_iter().map_while(move |row| {
            if !allowed {
                return None;
            }
            allowed = check.still_allowed();
            Some(if allowed {
                Ok(row)
            } else {
                Err(scope_changed())
            })
        }))
    }

    async fn run<F>(&self, scope: &Scope, statement: &Statement, bind: F) -> PgWireResult<Answer>
    where
        F: Fn(LogicalPlan) -> Result<LogicalPlan, QueryError> + Send + 'static,
    {
        let started = Instant::now();
        let metrics = &self.shared.metrics;
        let _running = metrics.running();
        let result = self.shared.views.run(scope, statement, bind).await;
        metrics.observe(Protocol::Pg, started.elapsed());
        match result {
            Ok(answer) => {
                metrics.served(Protocol::Pg);
                Ok(answer)
            }
            Err(e) => {
                metrics.failed(Protocol::Pg);
                Err(query_error(&e))
            }
        }
    }
}

/// Encodes the rows, decimals with every digit, the rest with arrow-pg.
pub fn encode_rows(
    fields: &Arc<Vec<FieldInfo>>,
    batches: &[RecordBatch],
) -> PgWireResult<Vec<DataRow>> {
    let mut rows = Vec::new();
    for batch in batches {
        let schema = batch.schema();
        let mut enc = DataRowEncoder::new(Arc::clone(fields));
        for row in 0..batch.num_rows() {
            for (i, column) in batch.columns().iter().enumerate() {
                let pg = &fields[i];
                if let DataType::Decimal128(_, scale) = column.data_type() {
                    let value = super::numeric::decimal_at(column.as_ref(), row).map(|v| Numeric {
                        value: v,
                        scale: *scale,
                    });
                    enc.encode_field_with_type_and_format(
                        &value,
                        pg.datatype(),
                        pg.format(),
                        pg.format_options(),
                    )?;
                } else {
                    encode_value(&mut enc, column, row, schema.field(i), pg)?;
                }
            }
            rows.push(enc.take_row());
        }
    }
    Ok(rows)
}

/// The lines of `COPY ... TO STDOUT` in Postgres's text or CSV format.
fn copy_lines(
    answer: &Answer,
    csv: bool,
    header: bool,
    delimiter: char,
) -> Result<Vec<String>, String> {
    let options = ArrowFormat::default()
        .with_null("\u{0}")
        .with_timestamp_tz_format(Some("%Y-%m-%d %H:%M:%S%.f%:::z"))
        .with_timestamp_format(Some("%Y-%m-%d %H:%M:%S%.f"));
    let mut lines = Vec::new();
    let quote = |s: &str| -> String {
        if csv {
            if s.contains(delimiter)
                || s.contains('"')
                || s.contains('\n')
                || s.contains('\r')
                || s.is_empty()
            {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_owned()
            }
        } else {
            s.replace('\\', "\\\\")
                .replace('\t', "\\t")
                .replace('\n', "\\n")
                .replace('\r', "\\r")
        }
    };
    // The header rides in the first message, so that pgwire's count of
    // messages (the `COPY n` tag) counts rows.
    let mut header_line = if header {
        let names: Vec<String> = answer
            .schema
            .fields()
            .iter()
            .map(|f| quote(f.name()))
            .collect();
        format!("{}\n", names.join(&delimiter.to_string()))
    } else {
        String::new()
    };
    for batch in &answer.batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        for row in 0..batch.num_rows() {
            let mut cells = Vec::with_capacity(formatters.len());
            for (f, c) in formatters.iter().zip(batch.columns()) {
                if c.is_null(row) {
                    cells.push(if csv { String::new() } else { "\\N".to_owned() });
                } else {
                    let text = f.value(row).to_string();
                    cells.push(if csv && text.is_empty() {
                        "\"\"".into()
                    } else {
                        quote(&text)
                    });
                }
            }
            let line = format!("{}\n", cells.join(&delimiter.to_string()));
            if header_line.is_empty() {
                lines.push(line);
            } else {
                lines.push(std::mem::take(&mut header_line) + &line);
            }
        }
    }
    if !header_line.is_empty() {
        lines.push(header_line);
    }
    Ok(lines)
}

fn no_params(plan: LogicalPlan) -> Result<LogicalPlan, QueryError> {
    Ok(plan)
}

#[async_trait]
impl SimpleQueryHandler for Connection {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = self.parser.parse_all(query)?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut responses = Vec::with_capacity(statements.len());
        for statement in statements {
            let kind = classify(statement);
            responses.push(
                self.answer(client, &kind, &Format::UnifiedText, no_params)
                    .await?,
            );
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Connection {
    type Statement = Arc<Prepared>;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        Arc::clone(&self.parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Arc<Prepared>>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Arc<Prepared>>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        let inferred: Vec<Option<&DataType>> = prepared.params.iter().map(Some).collect();
        let declared: Vec<Option<&Type>> = (0..prepared.params.len())
            .map(|i| {
                portal
                    .statement
                    .parameter_types
                    .get(i)
                    .and_then(|t| t.as_ref())
            })
            .collect();
        let values = deserialize_parameters_with_server_types(portal, &inferred, &declared)?;
        let bind = move |plan: LogicalPlan| {
            plan.replace_params_with_values(&values)
                .map_err(QueryError::Execute)
        };
        self.answer(client, &prepared.kind, &portal.result_column_format, bind)
            .await
    }
}

/// A connection refused before it starts (too many connections): pgwire
/// reads the startup packet and answers with this error.
pub struct Refuse(pub String);

#[async_trait]
impl StartupHandler for Refuse {
    async fn on_startup<C>(
        &self,
        _client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(_) => Err(fatal("53300", self.0.clone())),
            _ => Ok(()),
        }
    }
}

pub struct RefuseHandlers(pub Arc<Refuse>);

impl PgWireServerHandlers for RefuseHandlers {
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.0)
    }
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
