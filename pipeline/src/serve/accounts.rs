//! Accounts of `tally serve`: the users file, SCRAM-SHA-256 verifiers and
//! what each account may see.
//!
//! The file (TOML, `--users`, default `./tally-users.toml`) holds one table
//! per account with a verifier in the form Postgres keeps in `pg_authid`
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, RFC 7677)
//! and either `all_tenants = true` or a list of `tenants`. A verifier lets
//! the server check a password without being able to log in as the user:
//! the password, and the salted password that would be equivalent to it,
//! are never stored. `tally users` edits the file; `tally serve` rereads it
//! when it changes ([`AccountsFile`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::query::Scope;

/// Default path of the users file (`--users`, `TALLY_USERS_FILE`).
pub const DEFAULT_USERS_FILE: &str = "./tally-users.toml";

/// PBKDF2 iterations of a new verifier: Postgres's `scram_iterations`
/// default, which every client accepts.
pub const SCRAM_ITERATIONS: u32 = 4096;

/// The environment variable `tally users add` reads the password from.
pub const PASSWORD_ENV: &str = "TALLY_PASSWORD";

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    /// Reject: the file cannot be read; the caller says so and stops.
    #[error("cannot read the users file {}: {cause}; create it with `tally users add NAME --all-tenants` or point --users / TALLY_USERS_FILE at it", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// Reject: the file is not a users file.
    #[error("the users file {} is not valid: {cause}; fix it or recreate the accounts with `tally users add`", path.display())]
    Parse { path: PathBuf, cause: String },
    /// Reject: writing the file failed; nothing was changed.
    #[error("cannot write the users file {}: {cause}; check the directory exists and is writable", path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("account {name}: {problem}")]
    Invalid { name: String, problem: String },
    #[error("no account named {name} in {}; `tally users list` shows the accounts", path.display())]
    Unknown { name: String, path: PathBuf },
    #[error("cannot draw random bytes for the salt: {0}")]
    Random(String),
}

/// One account as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub verifier: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_tenants: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
}

impl Account {
    /// What the account sees.
    pub fn scope(&self) -> Scope {
        if self.all_tenants {
            Scope::AllTenants
        } else {
            Scope::tenants(self.tenants.clone())
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accounts {
    /// 32 random bytes (base64), written by the first `tally users add`:
    /// the made-up SCRAM salt of an unknown user name is derived from it,
    /// so it stays the same for the life of the file (across restarts of
    /// `tally serve`), as a real user's salt does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default)]
    pub users: BTreeMap<String, Account>,
}

const HEADER: &str = "# tally serve accounts: SCRAM-SHA-256 verifiers (never passwords).\n# Edit with `tally users add|remove|list`.\n\n";

impl Accounts {
    /// Reads `path`; a missing file is no accounts.
    pub fn load(path: &Path) -> Result<Accounts, AccountsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Accounts::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Accounts::default()),
            Err(cause) => Err(AccountsError::Read {
                path: path.to_path_buf(),
                cause,
            }),
        }
    }

    fn parse(path: &Path, text: &str) -> Result<Accounts, AccountsError> {
        let accounts: Accounts = toml::from_str(text).map_err(|e| AccountsError::Parse {
            path: path.to_path_buf(),
            cause: e.to_string(),
        })?;
        for (name, account) in &accounts.users {
            account_problem(name, account).map_err(|problem| AccountsError::Parse {
                path: path.to_path_buf(),
                cause: format!("account {name}: {problem}"),
            })?;
        }
        Ok(accounts)
    }

    /// The secret that unknown user names' made-up salts are derived from:
    /// the file's own, or, for a file written before it had one, a hash of
    /// its verifiers (as secret as they are, and stable while the accounts
    /// stay as they are; the next `tally users add` writes a real one).
    pub fn mock_salt_secret(&self) -> [u8; 32] {
        if let Some(bytes) = self.secret.as_deref().and_then(|s| B64.decode(s).ok()) {
            return Sha256::digest(&bytes).into();
        }
        let mut h = Sha256::new();
        h.update(b"tally mock salt\0");
        for (name, account) in &self.users {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(account.verifier.as_bytes());
            h.update([0]);
        }
        h.finalize().into()
    }

    /// Writes the file readable by its owner only, atomically.
    pub fn save(&self, path: &Path) -> Result<(), AccountsError> {
        let write = |cause| AccountsError::Write {
            path: path.to_path_buf(),
            cause,
        };
        let body = toml::to_string(self).map_err(|e| write(std::io::Error::other(e)))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(write)?;
            f.write_all(HEADER.as_bytes()).map_err(write)?;
            f.write_all(body.as_bytes()).map_err(write)?;
            f.sync_all().map_err(write)?;
        }
        crate::store::atomic::rename_into_place(&tmp, path).map_err(write)
    }
}

/// Why an account cannot be stored, if it cannot.
fn account_problem(name: &str, account: &Account) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_control()) {
        return Err(
            "a name is 1 to 63 characters without control characters (Postgres's limit)".into(),
        );
    }
    if account.all_tenants != account.tenants.is_empty() {
        return Err("give either --all-tenants or at least one --tenant".into());
    }
    if account.tenants.iter().any(|t| t.is_empty()) {
        return Err("a tenant is not empty".into());
    }
    Verifier::parse(&account.verifier)
        .map(|_| ())
        .ok_or_else(|| {
            "the verifier is not SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>".into()
        })
}

/// Creates or replaces an account.
pub fn add(
    path: &Path,
    name: &str,
    password: &str,
    tenants: Vec<String>,
    all_tenants: bool,
) -> Result<(), AccountsError> {
    let mut accounts = Accounts::load(path)?;
    if password.is_empty() {
        return Err(AccountsError::Invalid {
            name: name.into(),
            problem: "the password is empty".into(),
        });
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| AccountsError::Random(e.to_string()))?;
    if accounts.secret.is_none() {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| AccountsError::Random(e.to_string()))?;
        accounts.secret = Some(B64.encode(secret));
    }
    let account = Account {
        verifier: Verifier::new(password, &salt, SCRAM_ITERATIONS).to_string(),
        all_tenants,
        tenants: {
            let mut t = tenants;
            t.sort();
            t.dedup();
            t
        },
    };
    account_problem(name, &account).map_err(|problem| AccountsError::Invalid {
        name: name.into(),
        problem,
    })?;
    accounts.users.insert(name.to_owned(), account);
    accounts.save(path)
}

/// Removes an account; an unknown name is an error.
pub fn remove(path: &Path, name: &str) -> Result<(), AccountsError> {
    let mut accounts = Accounts::load(path)?;
    if accounts.users.remove(name).is_none() {
        return Err(AccountsError::Unknown {
            name: name.into(),
            path: path.to_path_buf(),
        });
    }
    accounts.save(path)
}

/// A SCRAM-SHA-256 verifier (RFC 5802 section 3 and RFC 7677).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

type HmacSha256 = Hmac<Sha256>;

pub(crate) fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

#[cold]
fn unreachable_hmac() -> ! {
    panic!("HMAC-SHA-256 takes keys of any length")
}

/// SASLprep as Postgres applies it: a password that is not valid for it is
/// used as its raw bytes.
pub(crate) fn normalize(password: &str) -> std::borrow::Cow<'_, str> {
    stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password))
}

impl Verifier {
    pub fn new(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(
            normalize(password).as_bytes(),
            salt,
            iterations,
            &mut salted,
        );
        let client_key = hmac(&salted, b"Client Key");
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Whether `password` is the one this verifier was made from (for
    /// HTTP Basic and the Flight handshake, which send the password).
    pub fn check(&self, password: &str) -> bool {
        let other = Verifier::new(password, &self.salt, self.iterations);
        other
            .stored_key
            .iter()
            .zip(self.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

impl std::fmt::Display for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// The users file as `tally serve` sees it: reread when its modification
/// time or size changes, checked at most once per [`AccountsFile::get`]
/// call (a `stat`), so that a removed account's sessions end at their next
/// query.
pub struct AccountsFile {
    path: PathBuf,
    current: Mutex<(Option<Stamp>, Arc<Accounts>)>,
    /// Bumped at every reread: a stream of rows in progress (a suspended
    /// portal, a Flight stream) compares one number per row instead of
    /// reading the file, and looks its account up again when it moved.
    generation: std::sync::atomic::AtomicU64,
}

impl AccountsFile {
    /// Reads the file once; a server refuses to start on a bad file.
    pub fn open(path: &Path) -> Result<AccountsFile, AccountsError> {
        let stamp = stamp(path);
        let accounts = Accounts::load(path)?;
        Ok(AccountsFile {
            path: path.to_path_buf(),
            current: Mutex::new((stamp, Arc::new(accounts))),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The accounts now. A file that became unreadable or invalid keeps the
    /// last good accounts and logs why (at every change of the file).
    pub fn get(&self) -> Arc<Accounts> {
        let now = stamp(&self.path);
        let mut current = match self.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if now != current.0 {
            current.0 = now;
            match Accounts::load(&self.path) {
                Ok(accounts) => {
                    tracing::info!(path = %self.path.display(), accounts = accounts.users.len(), "users file reread");
                    current.1 = Arc::new(accounts);
                    self.generation
                        .fetch_add(1, std::sync::atomic::Ordering::Release);
                }
                Err(e) => {
                    tracing::error!(error = %e, "users file changed but cannot be used; keeping the accounts read before")
                }
            }
        }
        Arc::clone(&current.1)
    }

    /// The account `name`, if it exists now.
    pub fn account(&self, name: &str) -> Option<Account> {
        self.get().users.get(name).cloned()
    }

    /// How many times the file was reread (see [`AccountsFile::get`], which
    /// `tally serve` also calls every [`WATCH_PERIOD`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// How often `tally serve` looks at the users file even when no query
/// comes, so that rows already on their way (a suspended portal, a Flight
/// stream) stop at most this long after an account was narrowed.
pub const WATCH_PERIOD: std::time::Duration = std::time::Duration::from_millis(50);

/// What one stream of rows may still show: the account and the scope its
/// rows were computed for. [`ScopeCheck::still_allowed`] is true while the
/// account exists with that very scope.
pub struct ScopeCheck {
    file: Arc<AccountsFile>,
    user: String,
    scope: Scope,
    seen: u64,
}

impl ScopeCheck {
    pub fn new(file: Arc<AccountsFile>, user: String, scope: Scope) -> ScopeCheck {
        let seen = file.generation();
        ScopeCheck {
            file,
            user,
            scope,
            seen,
        }
    }

    /// Whether the rows computed for the scope may still go out: one atomic
    /// read while the users file is unchanged.
    pub fn still_allowed(&mut self) -> bool {
        let now = self.file.generation();
        if now == self.seen {
            return true;
        }
        self.seen = now;
        self.file
            .account(&self.user)
            .is_some_and(|a| a.scope() == self.scope)
    }
}

/// Modification time and size of the users file.
type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_matches_postgres() {
        // RFC 7677's password, salt and count; the keys as Python's hashlib
        // computes them (PBKDF2-HMAC-SHA-256, HMAC "Client Key" hashed,
        // HMAC "Server Key").
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = Verifier::new("pencil", &salt, 4096);
        assert_eq!(
            v.to_string(),
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
        assert_eq!(Verifier::parse(&v.to_string()), Some(v));
        assert_eq!(Verifier::parse("SCRAM-SHA-256$0:AA==$AA==:AA=="), None);
        assert_eq!(Verifier::parse("md5abc"), None);
    }

    #[test]
    fn add_list_remove_keep_no_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        add(&path, "ops", "s3cret-pw", vec![], true).unwrap();
        add(
            &path,
            "acme",
            "other-pw",
            vec!["t2".into(), "t1".into(), "t1".into()],
            false,
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("s3cret-pw") && !text.contains("other-pw"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let accounts = Accounts::load(&path).unwrap();
        assert_eq!(accounts.users["ops"].scope(), Scope::AllTenants);
        assert_eq!(
            accounts.users["acme"].scope(),
            Scope::Tenants(vec!["t1".into(), "t2".into()])
        );
        assert!(matches!(
            add(&path, "x", "pw", vec![], false),
            Err(AccountsError::Invalid { .. })
        ));
        assert!(matches!(
            add(&path, "x", "", vec![], true),
            Err(AccountsError::Invalid { .. })
        ));
        remove(&path, "ops").unwrap();
        assert!(matches!(
            remove(&path, "ops"),
            Err(AccountsError::Unknown { .. })
        ));
        assert_eq!(Accounts::load(&path).unwrap().users.len(), 1);
    }

    #[test]
    fn unknown_names_get_the_same_made_up_salt_for_the_life_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        add(&path, "a", "pw", vec![], true).unwrap();
        let first = Accounts::load(&path).unwrap().mock_salt_secret();
        // Another account added or removed: the file's secret stays.
        add(&path, "b", "pw2", vec!["t1".into()], false).unwrap();
        remove(&path, "a").unwrap();
        assert_eq!(Accounts::load(&path).unwrap().mock_salt_secret(), first);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("secret = "), "{text}");
        // Another file has another secret.
        let other = dir.path().join("other.toml");
        add(&other, "a", "pw", vec![], true).unwrap();
        assert_ne!(Accounts::load(&other).unwrap().mock_salt_secret(), first);
    }

    #[test]
    fn a_changed_file_is_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        let file = AccountsFile::open(&path).unwrap();
        assert!(file.account("a").is_none());
        add(&path, "a", "pw", vec![], true).unwrap();
        assert!(file.account("a").is_some());
        remove(&path, "a").unwrap();
        assert!(file.account("a").is_none());
        std::fs::write(&path, "[users.b]\nverifier = 'x'\nall_tenants = true\n").unwrap();
        assert!(Accounts::load(&path).is_err());
    }
}
