//! A connection's start: the startup packet, SCRAM-SHA-256 against the
//! users file, the server parameters, the account's scope; and the refusal
//! of a connection over the limit.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::{
    ClientInfo, METADATA_DATABASE, METADATA_USER, PgWireConnectionState, PgWireServerHandlers,
};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

use super::errors::fatal;
use super::{AuthState, Connection, DATABASE};
use crate::query::Scope;
use crate::serve::Shared;
use crate::serve::postgres::SERVER_VERSION;
use crate::serve::scram::{Exchange, ScramError};

/// The login of a connection, once SCRAM succeeded.
pub(super) type Login = Arc<Mutex<Option<String>>>;

pub(super) fn login_user(login: &Login) -> Option<String> {
    match login.lock() {
        Ok(l) => l.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// The scope of the connection's account now; a removed account ends the
/// session.
pub(super) fn scope_of(shared: &Shared, login: &Login) -> PgWireResult<Scope> {
    let user = login_user(login).ok_or_else(|| fatal("28000", "not authenticated"))?;
    match shared.accounts.account(&user) {
        Some(a) => Ok(a.scope()),
        None => Err(fatal(
            "28000",
            format!("account {user} was removed from the users file; the session ends"),
        )),
    }
}

pub(super) fn parameters() -> DefaultServerParameterProvider {
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
                            .and_then(|a| crate::serve::accounts::Verifier::parse(&a.verifier));
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
                        .map_err(|e| scram_failed(&self.shared, &user, client.socket_addr(), e))?;
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
                        let server_final = exchange.finish(text).map_err(|e| {
                            scram_failed(&self.shared, &user, client.socket_addr(), e)
                        })?;
                        // Counted once the password is right: a stranger
                        // learns nothing of an account's sessions.
                        let Some(slot) = self.shared.slots.try_take(&user) else {
                            let max = self.shared.slots.max();
                            tracing::warn!(user = %user, peer = %client.socket_addr(), max, "pgwire login refused: the account holds all the connections it may");
                            return Err(fatal(
                                "53300",
                                format!(
                                    "too many connections for account \"{user}\": it holds the {max} it may (--max-connections-per-account); close idle ones or ask for a higher limit"
                                ),
                            ));
                        };
                        // A poisoned lock still takes the slot: dropping
                        // it would let the session run uncounted.
                        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(slot);
                        if let Some(key) = self.shared.cancels.register(Arc::clone(&self.cancelled))
                        {
                            client.set_pid_and_secret_key(
                                key.pid,
                                pgwire::messages::startup::SecretKey::I32(key.secret),
                            );
                            *self.cancel_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
                        }
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

pub(super) fn scram_failed(
    shared: &crate::serve::Shared,
    user: &str,
    peer: std::net::SocketAddr,
    e: ScramError,
) -> PgWireError {
    shared.refused(user, &format!("pgwire login refused from {peer}: {e}"));
    match e {
        ScramError::Failed => fatal(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        ),
        other => fatal("28000", other.to_string()),
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
