//! `tally users add|remove|list`: the accounts of `tally serve`.
//!
//! The password comes from `TALLY_PASSWORD` or one line on stdin, never
//! from the command line (where `ps` and shell history would keep it);
//! only its SCRAM-SHA-256 verifier is written.

use std::path::PathBuf;

use clap::Subcommand;
use std::io::BufRead;
use std::path::Path;

use crate::serve::accounts::{self, Accounts, AccountsError, PASSWORD_ENV};

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    /// Reject: the account would see nothing.
    #[error("say what the account sees: --tenant T (repeatable) or --all-tenants")]
    NoScope,
    /// Reject: no password was given.
    #[error("no password: set {PASSWORD_ENV} or give it as one line on stdin")]
    NoPassword,
    #[error("cannot read the password from stdin: {0}")]
    Stdin(std::io::Error),
    /// Reject: a tenant no event can have, so the account would see
    /// nothing of it.
    #[error(
        "--tenant {0:?} is not a tenant id: tenants are 1 to 64 letters, digits, '_' or '-' (and `_system`, the catalog's, is in no tenant's scope); check the name"
    )]
    BadTenant(String),
}

impl UsersError {
    /// Whether the command was used wrongly (exit 2) rather than failed.
    pub(crate) fn is_usage(&self) -> bool {
        matches!(
            self,
            UsersError::NoScope | UsersError::NoPassword | UsersError::BadTenant(_)
        )
    }
}

/// Creates or replaces `name`; returns what it sees, for the message.
pub(crate) fn add(
    users: &Path,
    name: &str,
    tenants: &[String],
    all_tenants: bool,
) -> Result<String, UsersError> {
    if !all_tenants && tenants.is_empty() {
        return Err(UsersError::NoScope);
    }
    if let Some(bad) = tenants.iter().find(|t| !is_tenant_id(t)) {
        return Err(UsersError::BadTenant(bad.clone()));
    }
    let password = read_password()?;
    accounts::add(users, name, &password, tenants.to_vec(), all_tenants)?;
    Ok(if all_tenants {
        "all tenants".to_owned()
    } else {
        format!("tenants {}", tenants.join(", "))
    })
}

/// A tenant id events can carry (events.md: `^[A-Za-z0-9_-]{1,64}$`),
/// other than the catalog's `_system`.
fn is_tenant_id(t: &str) -> bool {
    (1..=64).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && t != crate::event::partition::SYSTEM_TENANT
}

pub(crate) fn remove(users: &Path, name: &str) -> Result<(), UsersError> {
    Ok(accounts::remove(users, name)?)
}

/// One line per account: its name and what it sees.
pub(crate) fn list(users: &Path) -> Result<Vec<String>, UsersError> {
    let accounts = Accounts::load(users)?;
    Ok(accounts
        .users
        .iter()
        .map(|(name, a)| {
            if a.all_tenants {
                format!("{name}\tall tenants")
            } else {
                format!("{name}\ttenants: {}", a.tenants.join(", "))
            }
        })
        .collect())
}

fn read_password() -> Result<String, UsersError> {
    if let Ok(p) = std::env::var(PASSWORD_ENV)
        && !p.is_empty()
    {
        return Ok(p);
    }
    let stdin = std::io::stdin();
    // On a terminal the password is not echoed as it is typed.
    let echo_off = if std::io::IsTerminal::is_terminal(&stdin) {
        eprintln!("password (one line; or set {PASSWORD_ENV}):");
        rustix::termios::tcgetattr(&stdin).ok().and_then(|before| {
            let mut quiet = before.clone();
            quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
            rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet)
                .ok()
                .map(|()| before)
        })
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(before) = echo_off {
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &before);
        eprintln!();
    }
    read.map_err(UsersError::Stdin)?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err(UsersError::NoPassword);
    }
    Ok(password)
}

#[derive(Debug, Subcommand)]
pub enum UsersAction {
    /// Create or replace an account. The password comes from TALLY_PASSWORD,
    /// else one line on stdin; never from the command line.
    Add {
        /// The account's name (the login user).
        name: String,
        /// A tenant the account sees (repeat for more).
        #[arg(long = "tenant", env = "TALLY_USERS_TENANT")]
        tenants: Vec<String>,
        /// The account sees every tenant.
        #[arg(long, conflicts_with = "tenants", env = "TALLY_USERS_ALL_TENANTS")]
        all_tenants: bool,
        /// The users file `tally serve` reads (--users there).
        #[arg(long, env = "TALLY_USERS_FILE", default_value = crate::serve::accounts::DEFAULT_USERS_FILE)]
        users: PathBuf,
    },
    /// Remove an account; its open sessions end at their next query.
    Remove {
        /// The account's name.
        name: String,
        /// The users file `tally serve` reads (--users there).
        #[arg(long, env = "TALLY_USERS_FILE", default_value = crate::serve::accounts::DEFAULT_USERS_FILE)]
        users: PathBuf,
    },
    /// List the accounts and what they see.
    List {
        /// The users file `tally serve` reads (--users there).
        #[arg(long, env = "TALLY_USERS_FILE", default_value = crate::serve::accounts::DEFAULT_USERS_FILE)]
        users: PathBuf,
    },
}

/// `tally users`, from the command line.
pub(crate) fn command(action: &UsersAction) -> Result<(), super::CommandError> {
    use crate::commands::users;
    match action {
        UsersAction::Add {
            name,
            tenants,
            all_tenants,
            users: file,
        } => {
            let sees = users::add(file, name, tenants, *all_tenants)?;
            println!("account {name} ({sees}) saved in {}", file.display());
        }
        UsersAction::Remove { name, users: file } => {
            users::remove(file, name)?;
            println!("account {name} removed from {}", file.display());
        }
        UsersAction::List { users: file } => {
            let lines = users::list(file)?;
            if lines.is_empty() {
                println!(
                    "no accounts in {}; add one with `tally users add NAME --all-tenants`",
                    file.display()
                );
            }
            for l in lines {
                println!("{l}");
            }
        }
    }
    Ok(())
}
