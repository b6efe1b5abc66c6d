//! `tally generate`: the synthetic SaaS of [`crate::generator`] on stdout.

use super::{CommandError, Globals};
use crate::generator::{GenerateConfig, generate, parse_start};

/// The arguments of `tally generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Tenants of the synthetic SaaS.
    #[arg(long, default_value_t = 100, env = "TALLY_GENERATE_TENANTS")]
    pub(crate) tenants: u32,
    /// Months of history, from --start.
    #[arg(long, default_value_t = 12, env = "TALLY_GENERATE_MONTHS")]
    pub(crate) months: u32,
    /// Seed: the same seed and arguments give the same bytes.
    #[arg(long, default_value_t = 1, env = "TALLY_GENERATE_SEED")]
    pub(crate) seed: u64,
    /// First month, YYYY-MM.
    #[arg(long, default_value = "2025-01", env = "TALLY_GENERATE_START")]
    pub(crate) start: String,
    /// Only the billing lifecycle (catalog, signups, subscriptions,
    /// invoices): no usage or other activity. For subscription-scale tests.
    #[arg(long, env = "TALLY_GENERATE_NO_ACTIVITY")]
    pub(crate) no_activity: bool,
}

/// `tally generate`, from the command line.
pub(crate) async fn command(_g: &Globals, a: &GenerateArgs) -> Result<(), CommandError> {
    let GenerateArgs {
        tenants,
        months,
        seed,
        start,
        no_activity,
    } = a;
    let (start_year, start_month) =
        parse_start(start).map_err(|e| CommandError::Usage(e.to_string()))?;
    if *tenants == 0 || *months == 0 {
        return Err(CommandError::Usage(
            "--tenants and --months must be at least 1".into(),
        ));
    }
    let cfg = GenerateConfig {
        tenants: *tenants,
        months: *months,
        seed: *seed,
        start_year,
        start_month,
        source: "tally-generate".into(),
        activity: !*no_activity,
    };
    let mut stdout = super::Stdout::new();
    let stats = match generate(&cfg, &mut stdout) {
        Err(_) if stdout.reader_gone => return Ok(()),
        other => other?,
    };
    eprintln!(
        "generated {} events ({} duplicates, {} late)",
        stats.events, stats.duplicates, stats.late
    );
    Ok(())
}
