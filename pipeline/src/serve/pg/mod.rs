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
//!
//! The rooms: this file holds a connection and answers its statements;
//! [`startup`] logs it in; [`statement`] sorts statements and parses for
//! the extended protocol; [`rows`] encodes data rows and `COPY` lines;
//! [`errors`] says what went wrong, with its SQLSTATE.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::arrow_pg::datatypes::arrow_schema_to_pg_fields;
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters_with_server_types;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use futures::{Sink, SinkExt, stream};
use pgwire::api::DEFAULT_NAME;
use pgwire::api::auth::StartupHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{CopyResponse, DataRowEncoder, QueryResponse, Response, Tag};
use pgwire::api::stmt::StoredStatement;
use pgwire::api::store::Entry;
use pgwire::api::store::{MemPortalStore, PortalStore};
use pgwire::api::{ClientInfo, ClientPortalStore, ErrorHandler, PgWireServerHandlers, Type};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::copy::CopyData;
use pgwire::messages::data::DataRow;
use pgwire::messages::extendedquery::{
    Bind, BindComplete, Close, CloseComplete, Parse, ParseComplete, Sync as PgSync,
    TARGET_TYPE_BYTE_PORTAL, TARGET_TYPE_BYTE_STATEMENT,
};
use pgwire::messages::response::{ReadyForQuery, TransactionStatus};
use pgwire::types::format::FormatOptions;

use super::Shared;
use super::accounts::ScopeCheck;
use super::metrics::Protocol;
use super::postgres::setting;
use super::scram::Exchange;
use super::slots::AccountSlot;
use super::views::Answer;
use crate::query::{QueryError, Scope};

pub mod cancel;
mod errors;
mod names;
mod rows;
mod startup;
mod statement;

pub use errors::sqlstate;
use errors::{query_error, scope_changed, user_error};
use rows::copy_lines;
pub use rows::encode_rows;
use startup::{Login, login_user, scope_of};
pub use startup::{Refuse, RefuseHandlers};
use statement::show_schema;
pub use statement::{Kind, Parser, Prepared, classify};

/// The only database: another name is refused with `3D000`.
pub const DATABASE: &str = "tally";

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
    /// The account's slot this session holds once logged in; given back
    /// when the connection is dropped.
    slot: Mutex<Option<AccountSlot>>,
    /// Signalled by a cancel request with this session's key: stops the
    /// statement it runs (see [`cancel`]).
    cancelled: Arc<tokio::sync::Notify>,
    /// This session's key for cancel requests, once logged in.
    cancel_key: Mutex<Option<cancel::CancelKey>>,
    /// Its named prepared statements and portals (bounded; see [`names`]).
    names: names::Names,
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

/// Cursors one session may hold open at once.
const MAX_CURSORS: usize = 64;

impl Cursor {
    /// Bytes its rows still to fetch hold.
    fn bytes(&self) -> u64 {
        self.batches
            .iter()
            .map(|b| b.get_array_memory_size() as u64)
            .sum()
    }

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
            slot: Mutex::new(None),
            cancelled: Arc::new(tokio::sync::Notify::new()),
            cancel_key: Mutex::new(None),
            names: names::Names::default(),
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

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        Arc::new(cancel::OnCancel(Arc::clone(&self.0.shared.cancels)))
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
            Kind::Unsupported(what) => {
                self.shared.metrics.failed(Protocol::Pg);
                Err(user_error("0A000", what.clone()))
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
                let mut cursors = self.cursors.lock().await;
                let others = cursors.iter().filter(|(n, _)| *n != name);
                let (open, held) =
                    others.fold((0usize, 0u64), |(n, b), (_, c)| (n + 1, b + c.bytes()));
                if open >= MAX_CURSORS {
                    return Err(user_error(
                        "53000",
                        format!(
                            "this session has {open} cursors open, the most it may: CLOSE one (or CLOSE ALL) first"
                        ),
                    ));
                }
                let budget = self.shared.cursor_bytes;
                if held + cursor.bytes() > budget {
                    return Err(user_error(
                        "53200",
                        format!(
                            "the cursors of this session would hold {} MiB of rows, more than its share of --memory-limit ({} MiB, the limit shared by --max-connections): FETCH or CLOSE the others first, or narrow the query",
                            (held + cursor.bytes()).div_ceil(1 << 20),
                            budget >> 20
                        ),
                    ));
                }
                cursors.insert(name.clone(), cursor);
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
            Kind::Deallocate(Some(name)) => {
                if !self.names.remove_statement(name) {
                    return Err(user_error(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    ));
                }
                client.portal_store().rm_statement(name);
                Ok(Response::Execution(Tag::new("DEALLOCATE")))
            }
            Kind::Deallocate(None) => {
                for name in self.names.take_statements() {
                    client.portal_store().rm_statement(&name);
                }
                Ok(Response::Execution(Tag::new("DEALLOCATE ALL")))
            }
            Kind::Discard => {
                let store = client.portal_store();
                for name in self.names.take_statements() {
                    store.rm_statement(&name);
                }
                store.clear_portals();
                self.names.take_portals();
                self.cursors.lock().await.clear();
                Ok(Response::Execution(Tag::new("DISCARD ALL")))
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
        let result = tokio::select! {
            r = self.shared.views.run(scope, statement, bind) => r.map_err(|e| query_error(&e)),
            () = self.cancelled.notified() => {
                Err(user_error("57014", "canceling statement due to user request"))
            }
        };
        metrics.observe(Protocol::Pg, started.elapsed());
        match &result {
            Ok(_) => metrics.served(Protocol::Pg),
            Err(_) => metrics.failed(Protocol::Pg),
        }
        result
    }
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

    /// pgwire's Parse, with a named statement's name taken once (`42P05`
    /// until it is closed) and the session's named statements bounded.
    async fn on_parse<C>(&self, client: &mut C, message: Parse) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = names::named(message.name.as_deref());
        let (text, budget) = (message.query.len(), self.shared.cursor_bytes);
        if let Some(name) = name
            && self.names.has_statement(name)
        {
            // The same refusal `add_statement` gives, before the work of
            // planning.
            self.names.add_statement(name, text, budget)?;
        }
        let parsed = StoredStatement::parse(client, &message, self.query_parser()).await?;
        if let Some(name) = name {
            self.names.add_statement(name, text, budget)?;
        }
        match parsed {
            Some(statement) => client.portal_store().put_statement(Arc::new(statement)),
            None => client
                .portal_store()
                .put_empty_statement(name.unwrap_or(DEFAULT_NAME)),
        }
        client
            .send(PgWireBackendMessage::ParseComplete(ParseComplete::new()))
            .await?;
        Ok(())
    }

    /// pgwire's Bind, with Postgres's checks of what it supplies against
    /// what the statement takes, and the session's named portals bounded.
    async fn on_bind<C>(&self, client: &mut C, message: Bind) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement_name = message.statement_name.as_deref().unwrap_or(DEFAULT_NAME);
        let shown = names::named(message.statement_name.as_deref()).unwrap_or("");
        let (takes, columns, stored) = match client.portal_store().get_statement(statement_name) {
            Some(Entry::Value(stored)) => {
                let prepared = &stored.statement;
                let takes = prepared.params.len().max(stored.parameter_types.len());
                let columns = prepared.schema.as_ref().map(|s| s.fields().len());
                (takes, columns, Some(stored))
            }
            Some(Entry::Empty) => (0, None, None),
            None => {
                return Err(user_error(
                    "26000",
                    format!("prepared statement \"{shown}\" does not exist"),
                ));
            }
        };
        names::check_bind(
            shown,
            takes,
            message.parameters.len(),
            &message.parameter_format_codes,
            &message.result_column_format_codes,
            columns,
        )?;
        if let Some(portal) = names::named(message.portal_name.as_deref()) {
            self.names.add_portal(portal)?;
        }
        match stored {
            Some(stored) => {
                let portal = Portal::try_new(&message, stored)?;
                client.portal_store().put_portal(Arc::new(portal));
            }
            None => client
                .portal_store()
                .put_empty_portal(message.portal_name.as_deref().unwrap_or(DEFAULT_NAME)),
        }
        client
            .send(PgWireBackendMessage::BindComplete(BindComplete::new()))
            .await?;
        Ok(())
    }

    /// pgwire's Close, forgetting the name.
    async fn on_close<C>(&self, client: &mut C, message: Close) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        match message.target_type {
            TARGET_TYPE_BYTE_STATEMENT => {
                self.names.remove_statement(name);
                client.portal_store().rm_statement(name);
            }
            TARGET_TYPE_BYTE_PORTAL => {
                self.names.remove_portal(name);
                client.portal_store().rm_portal(name);
            }
            other => {
                return Err(user_error(
                    "08P01",
                    format!(
                        "invalid Close message subtype {other}: 'S' closes a statement, 'P' a portal"
                    ),
                ));
            }
        }
        client
            .send(PgWireBackendMessage::CloseComplete(CloseComplete::new()))
            .await?;
        Ok(())
    }

    /// pgwire's Sync; outside a transaction block it also closes the
    /// portals bound since (Postgres closes them with the implicit
    /// transaction a Sync ends).
    async fn on_sync<C>(&self, client: &mut C, _message: PgSync) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let store = client.portal_store();
        store.rm_portal(DEFAULT_NAME);
        if matches!(client.transaction_status(), TransactionStatus::Idle) {
            for name in self.names.take_portals() {
                store.rm_portal(&name);
            }
        }
        client
            .send(PgWireBackendMessage::ReadyForQuery(ReadyForQuery::new(
                client.transaction_status(),
            )))
            .await?;
        client.flush().await?;
        Ok(())
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
