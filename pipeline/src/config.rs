//! Settings that change results.
//!
//! They live in a TOML file (`--config`, default `<data dir>/tally.toml` when
//! present) with `deny_unknown_fields`, so a typo is an error rather than a
//! silently different number. The checkpoint records the effective
//! settings; resuming with different ones is refused, because the
//! views would then no longer be a function of the stream alone.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::event::Limits;
use crate::event::time::{DAY_US, MICROS};
use crate::event::validate::{
    DEFAULT_FUTURE_SKEW_US, DEFAULT_MAX_EVENT_AGE_US, MAX_MESSAGE_BYTES, duration_text,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error(
        "config {path}: {field} = {value:?} is not a duration; write e.g. \"90s\", \"5m\", \"1h\" or \"32d\""
    )]
    Duration {
        path: String,
        field: &'static str,
        value: String,
    },
}

/// The file as written by the user. Durations are strings like `"5m"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFile {
    /// How long (in stream time) a (tenant, source, id) is remembered for dedup.
    pub dedup_horizon: String,
    /// How far an event's time may be ahead of its publish time.
    pub future_skew: String,
    /// How far an event's time may be behind its publish time.
    pub max_event_age: String,
    /// Allowed lateness: a window is final once `end + lateness <= stream clock`.
    pub lateness: String,
    /// Usage window granularities: any of minute, hour, day, month.
    pub granularities: Vec<Granularity>,
    /// Largest accepted message, bytes.
    pub max_message_bytes: usize,
    /// Distinct values of a dimension per (tenant, metric, month) accepted.
    pub max_dimension_values: usize,
}

/// How long a (tenant, source, id) is remembered for dedup, by default.
pub const DEFAULT_DEDUP_HORIZON_US: i64 = 32 * DAY_US;
/// Allowed lateness before a window is final, by default.
pub const DEFAULT_LATENESS_US: i64 = 5 * 60 * MICROS;
/// Distinct values of a dimension per (tenant, metric, month) accepted, by
/// default (see `crate::state::cardinality`).
pub const DEFAULT_MAX_DIMENSION_VALUES: usize = 10_000;
/// Usage window granularities, by default.
pub const DEFAULT_GRANULARITIES: [Granularity; 3] =
    [Granularity::Hour, Granularity::Day, Granularity::Month];

/// A size of the usage view's windows, as the TOML names it (`"hour"`); a
/// name that is none of them is refused when the file is read, saying which
/// are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    Hour,
    Day,
    Month,
}

impl Granularity {
    /// How many granularities there are (a series keeps a window of each).
    pub const COUNT: usize = 4;

    /// A granularity's name (the settings parse them through serde).
    #[cfg(test)]
    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "minute" => Some(Granularity::Minute),
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            "month" => Some(Granularity::Month),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }
}

impl Default for ConfigFile {
    fn default() -> ConfigFile {
        let d = Settings::default();
        ConfigFile {
            dedup_horizon: duration_text(d.dedup_horizon_us),
            future_skew: duration_text(d.future_skew_us),
            max_event_age: duration_text(d.max_event_age_us),
            lateness: duration_text(d.lateness_us),
            granularities: d.granularities,
            max_message_bytes: d.max_message_bytes,
            max_dimension_values: d.max_dimension_values,
        }
    }
}

/// Effective settings, in microseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub dedup_horizon_us: i64,
    pub future_skew_us: i64,
    /// A checkpoint written before this setting existed holds the default,
    /// so its data directory resumes with the default settings.
    #[serde(default = "default_max_event_age_us")]
    pub max_event_age_us: i64,
    pub lateness_us: i64,
    pub granularities: Vec<Granularity>,
    pub max_message_bytes: usize,
    /// A checkpoint written before this setting existed holds the default.
    #[serde(default = "default_max_dimension_values")]
    pub max_dimension_values: usize,
}

fn default_max_dimension_values() -> usize {
    DEFAULT_MAX_DIMENSION_VALUES
}

impl Default for Settings {
    fn default() -> Settings {
        // The defaults are valid by construction.
        Settings {
            dedup_horizon_us: DEFAULT_DEDUP_HORIZON_US,
            future_skew_us: DEFAULT_FUTURE_SKEW_US,
            max_event_age_us: DEFAULT_MAX_EVENT_AGE_US,
            lateness_us: DEFAULT_LATENESS_US,
            granularities: DEFAULT_GRANULARITIES.to_vec(),
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_dimension_values: DEFAULT_MAX_DIMENSION_VALUES,
        }
    }
}

fn default_max_event_age_us() -> i64 {
    DEFAULT_MAX_EVENT_AGE_US
}

impl Settings {
    /// Loads `path`, or the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        let Some(path) = path else {
            return Ok(Settings::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown.clone(),
            source: Box::new(source),
        })?;
        Settings::from_file(&file, &shown)
    }

    pub fn from_file(file: &ConfigFile, shown: &str) -> Result<Settings, ConfigError> {
        let dur = |field: &'static str, value: &str| {
            parse_duration_us(value).ok_or_else(|| ConfigError::Duration {
                path: shown.to_owned(),
                field,
                value: value.to_owned(),
            })
        };
        Ok(Settings {
            dedup_horizon_us: dur("dedup_horizon", &file.dedup_horizon)?,
            future_skew_us: dur("future_skew", &file.future_skew)?,
            max_event_age_us: dur("max_event_age", &file.max_event_age)?,
            lateness_us: dur("lateness", &file.lateness)?,
            granularities: file.granularities.clone(),
            max_message_bytes: file.max_message_bytes,
            max_dimension_values: file.max_dimension_values,
        })
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.max_message_bytes,
            future_skew_us: self.future_skew_us,
            max_event_age_us: self.max_event_age_us,
        }
    }

    /// A one-line rendering for messages.
    pub fn fingerprint(&self) -> String {
        format!(
            "dedup={} skew={} max_age={} lateness={} granularities={} max_bytes={}",
            self.dedup_horizon_us,
            self.future_skew_us,
            self.max_event_age_us,
            self.lateness_us,
            self.granularities
                .iter()
                .map(|g| g.as_str())
                .collect::<Vec<_>>()
                .join(","),
            self.max_message_bytes
        )
    }
}

/// `"90s"`, `"5m"`, `"1h"`, `"32d"` -> microseconds.
pub fn parse_duration_us(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)?.checked_mul(MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_us("5m"), Some(300 * MICROS));
        assert_eq!(parse_duration_us("32d"), Some(32 * 86_400 * MICROS));
        assert_eq!(parse_duration_us("5"), None);
        assert_eq!(parse_duration_us("m"), None);
    }

    #[test]
    fn defaults_match_file_defaults() {
        assert_eq!(
            Settings::from_file(&ConfigFile::default(), "x").unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn max_event_age_is_read_and_limits_validation() {
        let file: ConfigFile = toml::from_str("max_event_age = \"30d\"").unwrap();
        let s = Settings::from_file(&file, "x").unwrap();
        assert_eq!(s.max_event_age_us, 30 * 86_400 * MICROS);
        assert_eq!(s.limits().max_event_age_us, 30 * 86_400 * MICROS);
        assert_ne!(s, Settings::default(), "a changed age changes the settings");
        assert!(s.fingerprint().contains("max_age=2592000000000"));
        let bad: ConfigFile = toml::from_str("max_event_age = \"ten years\"").unwrap();
        assert!(matches!(
            Settings::from_file(&bad, "x"),
            Err(ConfigError::Duration {
                field: "max_event_age",
                ..
            })
        ));
        assert_eq!(
            Settings::default().limits().max_event_age_us,
            Limits::default().max_event_age_us
        );
    }

    #[test]
    fn a_checkpoint_from_before_max_event_age_resumes_with_the_default() {
        // The settings as checkpoints stored them before `max_event_age`.
        let old = r#"{"dedup_horizon_us":2764800000000,"future_skew_us":3600000000,"lateness_us":300000000,"granularities":["hour","day","month"],"max_message_bytes":262144}"#;
        let s: Settings = serde_json::from_str(old).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<ConfigFile>("dedup_horizon = \"1d\"\nlatenes = \"1m\"").is_err());
    }

    #[test]
    fn granularities_are_typed_from_the_file_on() {
        let f: ConfigFile = toml::from_str("granularities = [\"minute\", \"day\"]").unwrap();
        assert_eq!(f.granularities, [Granularity::Minute, Granularity::Day]);
        let e = toml::from_str::<ConfigFile>("granularities = [\"week\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("week") && e.contains("minute"), "{e}");
        // The checkpoint's copy keeps the names it always had.
        let json = serde_json::to_string(&Settings::default()).unwrap();
        assert!(
            json.contains(r#""granularities":["hour","day","month"]"#),
            "{json}"
        );
    }
}
