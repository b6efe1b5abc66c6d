//! Start-up: load the data directory's checkpoint, check that it belongs
//! to this stream and these settings, bring the view files back to it, and
//! rebuild the processor's state from the views and the `events` archive.

use tracing::info;

use super::RuntimeError;
use super::processor::Processor;
use crate::config::Settings;
use crate::event::Event;
use crate::event::partition::Partition;
use crate::operator;
use crate::store::DataDir;
use crate::store::checkpoint::Checkpoint;
use crate::store::parquet::read_parquet;

/// Loads or starts the checkpoint, checks it belongs to this stream, these
/// settings and this partition (`None`: the whole stream), and brings the view directories back to it.
pub fn open_state(
    data_dir: &DataDir,
    settings: &Settings,
    stream: &str,
    stream_created: &str,
    prefix: &str,
    partition: Option<Partition>,
) -> Result<Processor, RuntimeError> {
    let checkpoint = match data_dir.checkpoint()? {
        None => {
            // A new data directory has views from the start (empty ones),
            // so readers can tell it from a mistyped path.
            let mut cp = Checkpoint::new(stream, stream_created, settings);
            cp.partition = partition;
            data_dir.commit(&cp)?;
            cp
        }
        Some(cp) => {
            if cp.partition != partition {
                return Err(RuntimeError::OtherPartition {
                    path: data_dir.path().to_path_buf(),
                    found: cp.partition,
                    wanted: partition,
                });
            }
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
    restore(&mut processor, data_dir)?;
    Ok(processor)
}

/// Rebuilds `processor`'s state from `data_dir`: the `events` archive, then
/// the stored rows of the versioned views (the processor does no I/O).
fn restore(processor: &mut Processor, data_dir: &DataDir) -> Result<(), RuntimeError> {
    processor.start_restore();
    for_each_archived(data_dir, |e| processor.restore_archived(e))?;
    for view in processor.versioned_views()? {
        for file in data_dir.view(view).files()? {
            for batch in read_parquet(&file.path)? {
                processor.restore_view(view, &batch?)?;
            }
        }
    }
    processor.finish_restore();
    Ok(())
}

/// Calls `f` with every archived event, in stream order.
pub fn for_each_archived(
    data_dir: &DataDir,
    mut f: impl FnMut(&Event),
) -> Result<(), RuntimeError> {
    for file in data_dir.view(operator::events::VIEW).files()? {
        for batch in read_parquet(&file.path)? {
            operator::events::decode(&batch?, |e| f(&e))?;
        }
    }
    Ok(())
}
