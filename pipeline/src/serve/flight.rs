//! The Arrow Flight SQL front of `tally serve` (arrow-flight on tonic).
//!
//! The handshake takes HTTP Basic credentials (what ADBC and
//! `pyarrow.flight` send) and answers with a bearer token that later calls
//! carry; Basic on a later call works too. Every call resolves its account
//! again, so a removed account's token stops working at once. Queries
//! (`CommandStatementQuery`, prepared statements) run through the same
//! [`super::views::Views`] as pgwire, for the account's scope, and return
//! the views' Arrow types unchanged. Catalog calls (`GetCatalogs`,
//! `GetDbSchemas`, `GetTables` with schemas, `GetTableTypes`,
//! `GetSqlInfo`) describe the views the account sees, which is what ADBC's
//! `get_objects` and `get_table_schema` read.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::datatypes::Schema;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::server::PeekableFlightDataStream;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementIngest, CommandStatementQuery,
    CommandStatementSubstraitPlan, CommandStatementUpdate, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use datafusion::sql::sqlparser::ast::Statement;
use futures::{Stream, TryStreamExt};
use prost::Message;
use tokio::net::TcpListener;

use super::gate::{Gate, Gated};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use super::Shared;
use super::accounts::ScopeCheck;
use super::metrics::Protocol;
use super::pg::sqlstate;
use super::views::Answer;
use crate::query::{QueryError, Scope};

/// The catalog and schema every view is in (as on pgwire).
pub const CATALOG: &str = "tally";
pub const SCHEMA: &str = "public";

/// Bearer tokens kept per account: a client that logs in again and
/// again pushes out its own account's oldest tokens, never another
/// account's.
const TOKENS_PER_ACCOUNT: usize = 256;

/// The bearer tokens handed out: token -> (user, the verifier the login
/// matched), and each account's tokens oldest first, so that the memory
/// they take is bounded per account (the accounts are the users file's).
#[derive(Default)]
struct Tokens {
    by_token: HashMap<String, (String, String)>,
    by_user: HashMap<String, std::collections::VecDeque<String>>,
}

impl Tokens {
    fn get(&self, token: &str) -> Option<(String, String)> {
        self.by_token.get(token).cloned()
    }

    /// Keeps `token` for `user`, dropping the account's oldest past
    /// [`TOKENS_PER_ACCOUNT`].
    fn insert(&mut self, token: String, user: String, verifier: String) {
        let mine = self.by_user.entry(user.clone()).or_default();
        mine.push_back(token.clone());
        while mine.len() > TOKENS_PER_ACCOUNT {
            if let Some(old) = mine.pop_front() {
                self.by_token.remove(&old);
            }
        }
        self.by_token.insert(token, (user, verifier));
    }
}

type DoGetStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send>>;

pub struct TallyFlight {
    shared: Arc<Shared>,
    /// The bearer tokens handed out: a token stops working when the
    /// account is removed or its password changes.
    tokens: Mutex<Tokens>,
    sql_info: SqlInfoData,
}

fn status_of(e: &QueryError) -> Status {
    let message = format!("{e} (SQLSTATE {})", sqlstate(e));
    match e {
        QueryError::ReadOnly { .. } => Status::permission_denied(message),
        QueryError::MemoryLimit { .. } | QueryError::OverBudget(_) => {
            Status::resource_exhausted(message)
        }
        QueryError::Timeout { .. } => Status::deadline_exceeded(message),
        QueryError::FileGone { .. }
        | QueryError::Unsettled { .. }
        | QueryError::Switched { .. } => Status::aborted(message),
        QueryError::NoViews { .. } | QueryError::NoPartition { .. } => {
            Status::failed_precondition(message)
        }
        QueryError::Execute(_)
        | QueryError::TooDeep { .. }
        | QueryError::ExpressionTooDeep
        | QueryError::PlanTooLarge { .. } => Status::invalid_argument(message),
        _ => Status::internal(message),
    }
}

impl TallyFlight {
    fn new(shared: Arc<Shared>) -> Result<TallyFlight, Status> {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "Tally");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::SqlDdlCatalog, false);
        b.append(SqlInfo::SqlDdlSchema, false);
        b.append(SqlInfo::SqlDdlTable, false);
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        let sql_info = b.build().map_err(|e| Status::internal(e.to_string()))?;
        Ok(TallyFlight {
            shared,
            tokens: Mutex::new(Tokens::default()),
            sql_info,
        })
    }

    /// The account scope of a call: its bearer token, or Basic credentials.
    fn scope<T>(&self, req: &Request<T>) -> Result<Scope, Status> {
        self.caller(req).map(|(_, scope)| scope)
    }

    /// The account of a call and its scope.
    fn caller<T>(&self, req: &Request<T>) -> Result<(String, Scope), Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "no credentials: connect with a user and password (HTTP Basic in the handshake)",
                )
            })?;
        let user = if let Some(token) = header.strip_prefix("Bearer ") {
            let (user, verifier) = self
                .tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(token.trim())
                .ok_or_else(|| Status::unauthenticated("unknown or expired token: log in again"))?;
            let current = self.shared.accounts.account(&user).map(|a| a.verifier);
            if current.as_deref() != Some(verifier.as_str()) {
                return Err(Status::unauthenticated(format!(
                    "account {user} was removed or its password changed: log in again"
                )));
            }
            user
        } else if let Some(basic) = header.strip_prefix("Basic ") {
            let (user, password) = decode_basic(basic)?;
            self.shared
                .login(&user, &password)
                .ok_or_else(|| Status::unauthenticated("password authentication failed"))?;
            user
        } else {
            return Err(Status::unauthenticated(
                "authorization must be Basic or Bearer",
            ));
        };
        let scope = self
            .shared
            .accounts
            .account(&user)
            .map(|a| a.scope())
            .ok_or_else(|| Status::unauthenticated(format!("account {user} was removed")))?;
        Ok((user, scope))
    }

    /// One of `user`'s Flight SQL calls that plan or run a query, held
    /// while it does: an account runs at most `--max-connections-per-account`
    /// at once, so that no one account's flood of calls takes the query
    /// threads and the line of turns from every other.
    fn call(&self, user: &str) -> Result<super::slots::AccountSlot, Status> {
        self.shared.flight_calls.try_take(user).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "account {user} already runs {} Flight SQL queries at once \
                 (--max-connections-per-account); wait for one to finish (SQLSTATE 53300)",
                self.shared.flight_calls.max()
            ))
        })
    }

    async fn statement(&self, sql: &str) -> Result<Statement, Status> {
        if sql.len() > super::MAX_QUERY_BYTES {
            return Err(Status::invalid_argument(format!(
                "the query is {} bytes; at most {} are accepted (SQLSTATE 54000)",
                sql.len(),
                super::MAX_QUERY_BYTES
            )));
        }
        crate::query::guard::check_text(sql).map_err(|e| status_of(&e))?;
        let mut statements =
            datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser::new()
                .parse(sql)
                .map_err(|e| {
                    Status::invalid_argument(format!("syntax error: {e} (SQLSTATE 42601)"))
                })?;
        if statements.len() != 1 {
            return Err(Status::invalid_argument(
                "give exactly one SQL statement per query",
            ));
        }
        Ok(statements.remove(0))
    }

    /// The result schema of `sql` for `scope`, planned on the latest
    /// checkpoint.
    async fn plan_schema(&self, user: &str, scope: &Scope, sql: &str) -> Result<Schema, Status> {
        let _call = self.call(user)?;
        let statement = self.statement(sql).await?;
        let plan = self
            .shared
            .views
            .plan(scope, &statement)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(plan.schema().as_arrow().clone())
    }

    async fn run(&self, user: &str, scope: &Scope, sql: &str) -> Result<Answer, Status> {
        let _call = self.call(user)?;
        let statement = self.statement(sql).await?;
        let metrics = &self.shared.metrics;
        let _running = metrics.running();
        let started = Instant::now();
        let result = self.shared.views.run(scope, &statement, Ok).await;
        metrics.observe(Protocol::Flight, started.elapsed());
        match result {
            Ok(a) => {
                metrics.served(Protocol::Flight);
                Ok(a)
            }
            Err(e) => {
                metrics.failed(Protocol::Flight);
                Err(status_of(&e))
            }
        }
    }

    /// The answer as a Flight stream that stops, with an error, at the
    /// first batch after the account lost the scope it was computed for.
    fn stream(&self, user: String, scope: Scope, answer: Answer) -> Response<DoGetStream> {
        let mut check = ScopeCheck::new(Arc::clone(&self.shared.accounts), user, scope);
        let mut allowed = true;
        let batches = futures::stream::iter(answer.batches.into_iter().map_while(move |batch| {
            if !allowed {
                return None;
            }
            allowed = check.still_allowed();
            Some(if allowed {
                Ok(batch)
            } else {
                Err(arrow_flight::error::FlightError::Tonic(Box::new(
                    Status::permission_denied(
                        "the account's tenants changed since these rows were computed; run the query again",
                    ),
                )))
            })
        }));
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(answer.schema)
            .build(batches)
            .map_err(Status::from);
        Response::new(Box::pin(stream))
    }

    fn info(
        schema: &Schema,
        ticket: Vec<u8>,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket));
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("cannot encode the schema: {e}")))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    /// The views `scope` sees, with their schemas, sorted by name.
    async fn tables(&self, scope: &Scope) -> Result<Vec<(String, Arc<Schema>)>, Status> {
        let snapshot = self
            .shared
            .views
            .current(scope)
            .await
            .map_err(|e| status_of(&e))?;
        let Some(schema) = snapshot.ctx.catalog(CATALOG).and_then(|c| c.schema(SCHEMA)) else {
            return Ok(vec![]);
        };
        let mut names = schema.table_names();
        names.retain(|n| !n.starts_with('_') || n.starts_with("_tally"));
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Ok(Some(t)) = schema.table(&name).await {
                out.push((name, t.schema()));
            }
        }
        Ok(out)
    }
}

/// Base64 with or without padding: Go's Flight client (ADBC) pads none.
pub const LENIENT_B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn decode_basic(basic: &str) -> Result<(String, String), Status> {
    let bytes = LENIENT_B64
        .decode(basic.trim())
        .map_err(|_| Status::unauthenticated("Basic credentials are not base64"))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Status::unauthenticated("Basic credentials are not UTF-8"))?;
    let (user, password) = text
        .split_once(':')
        .ok_or_else(|| Status::unauthenticated("Basic credentials are not user:password"))?;
    Ok((user.to_owned(), password.to_owned()))
}

fn encode_schema(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
    Ok(bytes)
}

fn once_batch(
    schema: arrow::datatypes::SchemaRef,
    batch: Result<arrow::array::RecordBatch, arrow_flight::error::FlightError>,
) -> Response<DoGetStream> {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async move { batch }))
        .map_err(Status::from);
    Response::new(Box::pin(stream))
}

#[tonic::async_trait]
impl FlightSqlService for TallyFlight {
    type FlightService = TallyFlight;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|h| h.strip_prefix("Basic "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "the handshake needs HTTP Basic credentials (user and password)",
                )
            })?;
        let (user, password) = decode_basic(header)?;
        let Some(account) = self.shared.login(&user, &password) else {
            return Err(Status::unauthenticated(format!(
                "password authentication failed for user \"{user}\""
            )));
        };
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| Status::internal(e.to_string()))?;
        let token = B64.encode(raw);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.clone(), user, account.verifier);
        let out = futures::stream::iter(vec![Ok(HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        })]);
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(out));
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|e| Status::internal(e.to_string()))?;
        response.metadata_mut().insert("authorization", value);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (user, scope) = self.caller(&request)?;
        let schema = self.plan_schema(&user, &scope, &query.query).await?;
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        TallyFlight::info(
            &schema,
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let (user, scope) = self.caller(&request)?;
        let sql = String::from_utf8(ticket.statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("the ticket is not a query"))?;
        let answer = self.run(&user, &scope, &sql).await?;
        Ok(self.stream(user, scope, answer))
    }

    async fn do_put_statement_update(
        &self,
        _ticket: CommandStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("an update statement"))
    }

    async fn do_put_statement_ingest(
        &self,
        _ticket: CommandStatementIngest,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("bulk ingest (adbc_ingest)"))
    }

    async fn do_put_prepared_statement_update(
        &self,
        _query: CommandPreparedStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("a prepared update"))
    }

    async fn do_put_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("a Substrait plan"))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let (user, scope) = self.caller(&request)?;
        let schema = self.plan_schema(&user, &scope, &query.query).await?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema: encode_schema(&schema)?,
            parameter_schema: encode_schema(&Schema::empty())?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        self.scope(&request)?;
        Ok(())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (user, scope) = self.caller(&request)?;
        let sql = String::from_utf8(cmd.prepared_statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("the handle is not a query"))?;
        let schema = self.plan_schema(&user, &scope, &sql).await?;
        TallyFlight::info(&schema, cmd.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let (user, scope) = self.caller(&request)?;
        let sql = String::from_utf8(cmd.prepared_statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("the handle is not a query"))?;
        let answer = self.run(&user, &scope, &sql).await?;
        Ok(self.stream(user, scope, answer))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        let schema = query.into_builder().schema();
        TallyFlight::info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.scope(&request)?;
        let mut b = query.into_builder();
        b.append(CATALOG);
        let schema = b.schema();
        Ok(once_batch(schema, b.build()))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        let schema = query.clone().into_builder().schema();
        TallyFlight::info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.scope(&request)?;
        let mut b = query.into_builder();
        b.append(CATALOG, SCHEMA);
        let schema = b.schema();
        Ok(once_batch(schema, b.build()))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        let schema = query.clone().into_builder().schema();
        TallyFlight::info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let scope = self.scope(&request)?;
        let tables = self.tables(&scope).await?;
        let mut b = query.into_builder();
        for (name, schema) in &tables {
            b.append(CATALOG, SCHEMA, name, "VIEW", schema)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        let schema = b.schema();
        Ok(once_batch(schema, b.build()))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        let schema = query.into_builder().schema();
        TallyFlight::info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.scope(&request)?;
        let mut b = query.into_builder();
        b.append("VIEW");
        let schema = b.schema();
        Ok(once_batch(schema, b.build()))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        let schema = query.clone().into_builder(&self.sql_info).schema();
        TallyFlight::info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.scope(&request)?;
        let b = query.into_builder(&self.sql_info);
        let schema = b.schema();
        Ok(once_batch(schema, b.build()))
    }

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<DoGetStream>, Status> {
        Err(Status::unimplemented(format!(
            "tally serve does not answer {}; it answers queries and catalog calls",
            message.type_url
        )))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Serves Flight SQL on `listener` until `stopped`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    gate: Gate,
    stopped: impl std::future::Future<Output = ()>,
) -> Result<(), super::ServeError> {
    let service = TallyFlight::new(shared).map_err(|e| super::ServeError::Flight(e.to_string()))?;
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| super::ServeError::Tls {
                cert: cert.clone(),
                key: key.clone(),
                cause: format!("{}: {e}", p.display()),
            })
        };
        let identity = tonic::transport::Identity::from_pem(read(&cert)?, read(&key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| super::ServeError::Tls {
                cert: cert.clone(),
                key: key.clone(),
                cause: e.to_string(),
            })?;
    }
    let incoming = gated_connections(listener, gate);
    builder
        .add_service(FlightServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, stopped)
        .await
        .map_err(|e| super::ServeError::Flight(e.to_string()))
}

/// The refusal of a call that would write.
fn read_only(what: &str) -> Status {
    Status::permission_denied(format!(
        "refused: tally serve is read-only ({what} is not allowed); send a query over the views instead (SQLSTATE 42501)"
    ))
}

/// The connections `gate` admits from `listener`, as a stream for tonic.
fn gated_connections(
    listener: TcpListener,
    gate: Gate,
) -> impl Stream<Item = Result<Gated, std::io::Error>> {
    futures::stream::unfold((listener, gate), |(l, g)| async move {
        let (conn, _) = g.accept(&l).await;
        Some((Ok(conn), (l, g)))
    })
}

impl tonic::transport::server::Connected for Gated {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::{TOKENS_PER_ACCOUNT, Tokens};

    /// One account logging in again and again pushes out only its own
    /// oldest tokens.
    #[test]
    fn tokens_are_bounded_per_account() {
        let mut t = Tokens::default();
        t.insert("ops-1".into(), "ops".into(), "v".into());
        for i in 0..TOKENS_PER_ACCOUNT + 10 {
            t.insert(format!("acme-{i}"), "acme".into(), "w".into());
        }
        assert_eq!(t.get("ops-1"), Some(("ops".into(), "v".into())));
        assert_eq!(t.get("acme-0"), None);
        assert_eq!(t.get("acme-9"), None);
        assert!(t.get("acme-10").is_some());
        assert_eq!(t.by_token.len(), TOKENS_PER_ACCOUNT + 1);
    }
}
