//! `tally users add|remove|list`: the accounts of `tally serve`.
//!
//! The password comes from `TALLY_PASSWORD` or one line on stdin, never
//! from the command line (where `ps` and shell history would keep it);
//! only its SCRAM-SHA-256 verifier is written.

use std::io::BufRead;

use crate::cli::{CliError, UsersAction};
use crate::serve::accounts::{self, Accounts, PASSWORD_ENV};

pub fn users(action: &UsersAction) -> Result<(), CliError> {
    match action {
        UsersAction::Add {
            name,
            tenants,
            all_tenants,
            users,
        } => {
            if !all_tenants && tenants.is_empty() {
                return Err(CliError::Usage(
                    "say what the account sees: --tenant T (repeatable) or --all-tenants".into(),
                ));
            }
            let password = read_password()?;
            accounts::add(users, name, &password, tenants.clone(), *all_tenants)?;
            let sees = if *all_tenants {
                "all tenants".to_owned()
            } else {
                format!("tenants {}", tenants.join(", "))
            };
            println!("account {name} ({sees}) saved in {}", users.display());
            Ok(())
        }
        UsersAction::Remove { name, users } => {
            accounts::remove(users, name)?;
            println!("account {name} removed from {}", users.display());
            Ok(())
        }
        UsersAction::List { users } => {
            let accounts = Accounts::load(users)?;
            if accounts.users.is_empty() {
                println!(
                    "no accounts in {}; add one with `tally users add NAME --all-tenants`",
                    users.display()
                );
            }
            for (name, a) in &accounts.users {
                if a.all_tenants {
                    println!("{name}\tall tenants");
                } else {
                    println!("{name}\ttenants: {}", a.tenants.join(", "));
                }
            }
            Ok(())
        }
    }
}

fn read_password() -> Result<String, CliError> {
    if let Ok(p) = std::env::var(PASSWORD_ENV)
        && !p.is_empty()
    {
        return Ok(p);
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!("password (one line; or set {PASSWORD_ENV}):");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|source| CliError::Input {
            what: "the password from stdin".into(),
            source,
        })?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err(CliError::Usage(format!(
            "no password: set {PASSWORD_ENV} or give it as one line on stdin"
        )));
    }
    Ok(password)
}
