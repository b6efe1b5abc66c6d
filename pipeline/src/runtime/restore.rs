//! Start-up: load the data directory's checkpoint, check that it belongs
//! to this stream and these settings, bring the view files back to it, and
//! rebuild the processor's state from the views and the `events` archive.

use arrow::array::{Array, StringArray, TimestampMicrosecondArray, UInt64Array};
use tracing::info;

use super::RuntimeError;
use super::processor::Processor;
use crate::config::Settings;
use crate::event::{Event, Text, payload_from_archive};
use crate::operator::{self, OperatorError};
use crate::store::DataDir;
use crate::store::checkpoint::Checkpoint;
use crate::store::parquet::read_parquet;

/// Loads or starts the checkpoint, checks it belongs to this stream and
/// these settings, and brings the view directories back to it.
pub fn open_state(
    data_dir: &DataDir,
    settings: &Settings,
    stream: &str,
    stream_created: &str,
    prefix: &str,
) -> Result<Processor, RuntimeError> {
    let checkpoint = match data_dir.checkpoint()? {
        None => Checkpoint::new(stream, stream_created, settings),
        Some(cp) => {
            if cp.stream != stream || cp.stream_created != stream_created {
                return Err(RuntimeError::OtherStream {
                    path: data_dir.path().to_path_buf(),
                    found: cp.stream,
                    found_created: cp.stream_created,
                    wanted: stream.to_owned(),
                    wanted_created: stream_created.to_owned(),
                });
            }
            if cp.settings != *settings {
                return Err(RuntimeError::SettingsChanged {
                    path: data_dir.path().to_path_buf(),
                    found: cp.settings.fingerprint(),
                    wanted: settings.fingerprint(),
                });
            }
            cp
        }
    };
    let mut processor = Processor::new(settings, prefix, checkpoint);
    for (view, _) in processor.view_schemas() {
        let dir = data_dir.view(view);
        dir.create()?;
        let removed = dir.recover(processor.checkpoint.last_seq)?;
        if removed > 0 {
            info!(
                view,
                removed, "removed view files a crash left beyond the checkpoint"
            );
        }
    }
    processor.restore(data_dir)?;
    Ok(processor)
}

/// Calls `f` with every archived event, in stream order.
pub fn for_each_archived(
    data_dir: &DataDir,
    mut f: impl FnMut(&Event),
) -> Result<(), RuntimeError> {
    let view = operator::events::VIEW;
    let bad = |detail: String| RuntimeError::Operator(OperatorError::Restore { view, detail });
    for file in data_dir.view(view).files()? {
        for batch in read_parquet(&file.path)? {
            let batch = batch?;
            let s = |name: &str| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .ok_or_else(|| bad(format!("column {name} missing")))
            };
            let t = |name: &str| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
                    .ok_or_else(|| bad(format!("column {name} missing")))
            };
            let seqs = batch
                .column_by_name("stream_seq")
                .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
                .ok_or_else(|| bad("column stream_seq missing".into()))?;
            let (id, source, ty, tenant, dv) = (
                s("id")?,
                s("source")?,
                s("type")?,
                s("tenant")?,
                s("dataversion")?,
            );
            let (actor, actortype, subject, data) =
                (s("actor")?, s("actortype")?, s("subject")?, s("data")?);
            let (published, time) = (t("published_at")?, t("time")?);
            let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_owned());
            for i in 0..batch.num_rows() {
                let data_text = opt(data, i);
                let payload =
                    payload_from_archive(ty.value(i), data_text.as_deref()).map_err(|r| {
                        bad(format!(
                            "archived event {} at seq {}: {r}",
                            id.value(i),
                            seqs.value(i)
                        ))
                    })?;
                f(&Event {
                    stream_seq: seqs.value(i),
                    published_at: published.value(i),
                    id: id.value(i).into(),
                    source: source.value(i).into(),
                    event_type: ty.value(i).into(),
                    tenant: tenant.value(i).into(),
                    time: time.value(i),
                    dataversion: dv.value(i).into(),
                    actor: opt(actor, i).map(Text::from),
                    actortype: opt(actortype, i).map(Text::from),
                    subject: opt(subject, i).map(Text::from),
                    data: data_text.map(Text::from),
                    payload,
                });
            }
        }
    }
    Ok(())
}
