//! Embeds the `queries/*.sql` views in the binary, so `tally sql` knows
//! `churn`, `ltv` and the others from any working directory.
//!
//! Writes `$OUT_DIR/builtin_queries.rs`: a sorted table of (view name,
//! `include_str!` of the file). `include_str!` makes the compiler track each
//! file's content; `rerun-if-changed` on the directory makes cargo rerun
//! this script when a file is added, removed or renamed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[path = "src/query/view_name.rs"]
mod view_name;

/// A failed step, printed as its message (a build script's `main` error is
/// shown with `Debug`, which would quote and escape a plain `String`).
struct BuildError(String);

impl std::fmt::Debug for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for BuildError {
    fn from(s: String) -> BuildError {
        BuildError(s)
    }
}

impl From<&str> for BuildError {
    fn from(s: &str) -> BuildError {
        BuildError(s.to_owned())
    }
}

fn main() -> Result<(), BuildError> {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .ok_or("CARGO_MANIFEST_DIR is not set: run the build through cargo")?;
    let dir = Path::new(&manifest).join("..").join("queries");
    println!("cargo:rerun-if-changed={}", dir.display());
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        format!(
            "cannot list {} ({e}): the built-in views of `tally sql` are built from it",
            dir.display()
        )
    })?;
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .path();
        if path.extension().is_none_or(|x| x != "sql") {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if !view_name::is_valid_view_name(&name) {
            return Err(BuildError(format!(
                "{}: a view file must be named <name>.sql with a lower-case name of letters, digits and _",
                path.display()
            )));
        }
        let path = std::fs::canonicalize(&path)
            .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
        println!("cargo:rerun-if-changed={}", path.display());
        files.push((name, path));
    }
    files.sort();
    let mut code = String::from(
        "/// The `queries/*.sql` views compiled into the binary: (name, SQL), by name.\n\
         pub static BUILTIN_QUERIES: &[(&str, &str)] = &[\n",
    );
    for (name, path) in &files {
        let path = path
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
        writeln!(code, "    ({name:?}, include_str!({path:?})),").map_err(|e| e.to_string())?;
    }
    code.push_str("];\n");
    let out =
        std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set: run the build through cargo")?;
    let target = Path::new(&out).join("builtin_queries.rs");
    std::fs::write(&target, code)
        .map_err(|e| BuildError(format!("cannot write {}: {e}", target.display())))
}
