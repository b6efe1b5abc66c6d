//! Parquet files of the views, written atomically.
//!
//! Each batch appends one file per view it touched, named by the stream
//! sequences it covers: `seq-<first>-<last>.parquet` (20-digit, so names sort
//! by position). A file is written to `<name>.tmp`, fsynced and renamed; the
//! checkpoint is written only after every rename, so after a crash any file
//! whose first sequence is beyond the checkpoint is an orphan and is removed
//! at start-up ([`ViewDir::recover`]).
//!
//! Many small files slow queries, so [`ViewDir::compact`] merges runs of
//! small files into one covering their whole range. It writes the merged
//! file first and deletes the parts after; a file whose range lies inside
//! another file's range is ignored by readers and removed by recovery, so a
//! crash in between never shows a row twice. Cost: a compaction rewrites the
//! small files once (at most `COMPACT_MAX_FILE_BYTES` each). When every row
//! group of a run is large (a batch's rows of the `events` archive, say),
//! the row groups are copied into the merged file as they are, without
//! decoding or encoding a value; a run with small row groups is decoded and
//! re-encoded, so that they coalesce.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::atomic::{rename_into_place, sync_dir};

/// A file smaller than this is a candidate for compaction.
const COMPACT_MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// Compact once a view has this many small files.
const COMPACT_TRIGGER: usize = 32;
/// Row groups with at least this many rows are copied as they are when
/// files are merged (see the module doc).
const COPY_MIN_ROWS: i64 = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ViewFilesError {
    #[error("cannot create view directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode Parquet {path}: {source}")]
    Encode {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("cannot read Parquet {path}: {source}")]
    Decode {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("cannot read Parquet {path}: {source}")]
    Arrow {
        path: PathBuf,
        source: arrow::error::ArrowError,
    },
    #[error("cannot list {path}: {source}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot sort a view's rows by tenant before writing them: {0}")]
    Sort(arrow::error::ArrowError),
    #[error("cannot build a view's snapshot: {0}")]
    Snapshot(Box<dyn std::error::Error + Send + Sync>),
    #[error("the thread encoding {path} stopped before finishing it")]
    Encoder { path: PathBuf },
    #[error("a view's snapshot was not built to its end")]
    Unfinished,
}

/// One Parquet file of a view and the stream sequences it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewFile {
    pub path: PathBuf,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
}

fn file_name(first: u64, last: u64) -> String {
    format!("seq-{first:020}-{last:020}.parquet")
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("seq-")?.strip_suffix(".parquet")?;
    let (a, b) = rest.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The root of all views: `<data dir>/views`.
pub fn views_root(data_dir: &Path) -> PathBuf {
    data_dir.join("views")
}

/// The directory of one view.
pub struct ViewDir {
    pub dir: PathBuf,
}

impl ViewDir {
    pub fn new(data_dir: &Path, view: &str) -> ViewDir {
        ViewDir {
            dir: views_root(data_dir).join(view),
        }
    }

    /// Where the file covering `first..=last` is (or goes).
    pub fn file_path(&self, first: u64, last: u64) -> PathBuf {
        self.dir.join(file_name(first, last))
    }

    pub fn create(&self) -> Result<(), ViewFilesError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| ViewFilesError::CreateDir {
            path: self.dir.clone(),
            source,
        })
    }

    /// The directory's entries; none if it does not exist (yet).
    fn entries(&self) -> Result<Vec<std::fs::DirEntry>, ViewFilesError> {
        let list = |source| ViewFilesError::List {
            path: self.dir.clone(),
            source,
        };
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries.map(|e| e.map_err(list)).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(list(source)),
        }
    }

    /// Every `seq-*.parquet` file, sorted by first sequence, without the
    /// files whose range lies inside another's (compaction leftovers).
    pub fn files(&self) -> Result<Vec<ViewFile>, ViewFilesError> {
        let mut files = Vec::new();
        for entry in self.entries()? {
            let name = entry.file_name();
            let Some((first, last)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            files.push(ViewFile {
                path: entry.path(),
                first_seq: first,
                last_seq: last,
                bytes,
            });
        }
        // Widest first among equal starts, so a covering file precedes its parts.
        files.sort_by(|a, b| {
            a.first_seq
                .cmp(&b.first_seq)
                .then(b.last_seq.cmp(&a.last_seq))
        });
        let mut kept: Vec<ViewFile> = Vec::with_capacity(files.len());
        for f in files {
            if kept.last().is_some_and(|k| k.last_seq >= f.last_seq) {
                continue;
            }
            kept.push(f);
        }
        Ok(kept)
    }

    /// Makes the directory agree with a checkpoint at `last_seq`: removes
    /// temp files, files beyond the checkpoint, and compaction leftovers.
    pub fn recover(&self, last_seq: u64) -> Result<usize, ViewFilesError> {
        let keep: Vec<PathBuf> = self
            .files()?
            .into_iter()
            .filter(|f| f.last_seq <= last_seq)
            .map(|f| f.path)
            .collect();
        let mut removed = 0;
        for entry in self.entries()? {
            let path = entry.path();
            let name = entry.file_name();
            let ours = name
                .to_str()
                .is_some_and(|n| n.ends_with(".tmp") || parse_name(n).is_some());
            if ours && !keep.contains(&path) {
                std::fs::remove_file(&path).map_err(|source| ViewFilesError::Io {
                    path: path.clone(),
                    source,
                })?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.dir).map_err(|source| ViewFilesError::Io {
                path: self.dir.clone(),
                source,
            })?;
        }
        Ok(removed)
    }

    /// Writes `batches` as the file covering `first..=last`, atomically.
    pub fn write(
        &self,
        first: u64,
        last: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<PathBuf, ViewFilesError> {
        let path = self.dir.join(file_name(first, last));
        write_parquet(&path, schema, batches)?;
        Ok(path)
    }

    /// Puts the finished file `from` (of another data directory) in place
    /// as the file covering `first..=last`: a hard link when both are on
    /// one file system, else a copy; durable before it returns.
    pub fn link(&self, from: &Path, first: u64, last: u64) -> Result<PathBuf, ViewFilesError> {
        let path = self.dir.join(file_name(first, last));
        let io = |source| ViewFilesError::Io {
            path: path.clone(),
            source,
        };
        // A retry after a failure may find its own earlier link.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        if std::fs::hard_link(from, &path).is_err() {
            let tmp = path.with_extension("parquet.tmp");
            std::fs::copy(from, &tmp).map_err(io)?;
            File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
            return rename_into_place(&tmp, &path)
                .map(|()| path.clone())
                .map_err(io);
        }
        sync_dir(&self.dir).map_err(io)?;
        Ok(path)
    }

    /// Merges runs of small files once there are enough of them. Only files
    /// at or below `upto` (the checkpoint) are touched.
    pub fn compact(&self, schema: &SchemaRef, upto: u64) -> Result<usize, ViewFilesError> {
        let files: Vec<ViewFile> = self
            .files()?
            .into_iter()
            .filter(|f| f.last_seq <= upto)
            .collect();
        let small = |f: &&ViewFile| f.bytes < COMPACT_MAX_FILE_BYTES;
        if files.iter().filter(small).count() < COMPACT_TRIGGER {
            return Ok(0);
        }
        // A snapshot stays as it is, however small: merged with newer
        // versions it would no longer hold each key once. Only a small
        // file covering the stream from its start can be one, so only its
        // footer is read, and only once a compaction is due.
        let snapshot = files
            .first()
            .filter(|f| small(f) && f.first_seq == 1 && has_unique_keys_file(&f.path))
            .map(|f| f.path.clone());
        let mergeable = |f: &ViewFile| small(&f) && Some(&f.path) != snapshot.as_ref();
        if files.iter().filter(|f| mergeable(f)).count() < COMPACT_TRIGGER {
            return Ok(0);
        }
        // Merge the maximal runs of adjacent small files (a large file in
        // between breaks a run: merged files must cover contiguous ranges).
        let mut merged = 0;
        let mut run: Vec<&ViewFile> = Vec::new();
        let mut runs = Vec::new();
        for f in &files {
            if mergeable(f) {
                run.push(f);
            } else if !run.is_empty() {
                runs.push(std::mem::take(&mut run));
            }
        }
        if !run.is_empty() {
            runs.push(run);
        }
        for run in runs.into_iter().filter(|r| r.len() > 1) {
            let first = run[0].first_seq;
            let last = run[run.len() - 1].last_seq;
            // Streamed: one batch of one file in memory at a time (a run of
            // the events archive decodes to several hundred MB).
            let path = self.dir.join(file_name(first, last));
            if !copy_row_groups(&path, &run)? {
                write_parquet_with(&path, schema, false, |write| {
                    for f in &run {
                        for batch in read_parquet(&f.path)? {
                            let batch = conform(batch?, schema).map_err(|source| {
                                ViewFilesError::Arrow {
                                    path: f.path.clone(),
                                    source,
                                }
                            })?;
                            write(&batch)?;
                        }
                    }
                    Ok(())
                })?;
            }
            for f in &run {
                std::fs::remove_file(&f.path).map_err(|source| ViewFilesError::Io {
                    path: f.path.clone(),
                    source,
                })?;
            }
            sync_dir(&self.dir).map_err(|source| ViewFilesError::Io {
                path: self.dir.clone(),
                source,
            })?;
            merged += run.len();
        }
        Ok(merged)
    }
}

/// Whether the file at `path` carries [`UNIQUE_KEYS`] (reads its footer);
/// false for a file that cannot be read.
pub fn has_unique_keys_file(path: &Path) -> bool {
    File::open(path).is_ok_and(|file| {
        parquet::file::metadata::ParquetMetaDataReader::new()
            .parse_and_finish(&file)
            .is_ok_and(|m| has_unique_keys(&m))
    })
}

impl ViewDir {
    /// Writes `batch`, a snapshot of the state (each key once, in key
    /// order), as the file covering `1..=upto`, marked [`UNIQUE_KEYS`], and
    /// deletes the files it covers. A crash in between leaves covered files
    /// that readers ignore and recovery removes.
    #[cfg(test)]
    pub fn replace_with(
        &self,
        upto: u64,
        schema: &SchemaRef,
        batch: &RecordBatch,
    ) -> Result<usize, ViewFilesError> {
        let once = std::iter::once(Ok::<_, ViewFilesError>(batch.clone()));
        self.replace_with_chunks(upto, schema, once)
    }

    /// [`ViewDir::replace_with`] from the snapshot's rows in chunks, in key
    /// order: memory holds two chunks (one being built, one being encoded)
    /// and the row group being encoded, not the whole snapshot. A chunk's
    /// error is [`ViewFilesError::Snapshot`].
    pub fn replace_with_chunks<E>(
        &self,
        upto: u64,
        schema: &SchemaRef,
        chunks: impl Iterator<Item = Result<RecordBatch, E>>,
    ) -> Result<usize, ViewFilesError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let old: Vec<ViewFile> = self
            .files()?
            .into_iter()
            .filter(|f| f.last_seq <= upto)
            .collect();
        let keep = self.dir.join(file_name(1, upto));
        // The chunks are built on this thread and encoded on another, one
        // chunk apart: building a chunk (the state read in key order) and
        // encoding the one before take about as long, and while a stopping
        // run writes its snapshots the second core has nothing else to do.
        // The hand-over waits for the encoder (no queue), so memory holds
        // two chunks, not three. The last chunk is followed by `None`: a
        // channel closed without it (a chunk's error, or a panic while
        // building one) leaves no file, never a snapshot cut short.
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Option<RecordBatch>>(0);
            let encoder = scope.spawn(|| {
                write_parquet_with(&keep, schema, true, move |write| {
                    loop {
                        match rx.recv() {
                            Ok(Some(chunk)) => write(&chunk)?,
                            Ok(None) => return Ok(()),
                            Err(_) => return Err(ViewFilesError::Unfinished),
                        }
                    }
                })
            });
            let mut built = Ok(());
            for chunk in chunks {
                match chunk {
                    // A closed channel: the encoder failed, and says why below.
                    Ok(chunk) => {
                        if tx.send(Some(chunk)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        built = Err(ViewFilesError::Snapshot(Box::new(e)));
                        break;
                    }
                }
            }
            if built.is_ok() {
                let _ = tx.send(None);
            }
            drop(tx);
            let encoded = encoder
                .join()
                .map_err(|_| ViewFilesError::Encoder { path: keep.clone() })?;
            built.and(encoded)
        })?;
        let mut removed = 0;
        for f in old.iter().filter(|f| f.path != keep) {
            std::fs::remove_file(&f.path).map_err(|source| ViewFilesError::Io {
                path: f.path.clone(),
                source,
            })?;
            removed += 1;
        }
        sync_dir(&self.dir).map_err(|source| ViewFilesError::Io {
            path: self.dir.clone(),
            source,
        })?;
        Ok(removed)
    }
}

/// `batch` in `schema`: a file written before a column was added to its
/// view lacks it, and reads it as NULL (the column is nullable).
fn conform(
    batch: RecordBatch,
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) => Arc::clone(c),
            None => arrow::array::new_null_array(f.data_type(), batch.num_rows()),
        })
        .collect();
    RecordBatch::try_new(Arc::clone(schema), columns)
}

/// Writes `files` (one schema) as one file at `path` by copying their row
/// groups' bytes, if every row group has at least [`COPY_MIN_ROWS`] rows;
/// false (and nothing written) otherwise. The Arrow schema and other
/// key-value metadata of the first file are carried over.
fn copy_row_groups(path: &Path, files: &[&ViewFile]) -> Result<bool, ViewFilesError> {
    use parquet::column::writer::ColumnCloseResult;
    use parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader};
    use parquet::file::writer::SerializedFileWriter;

    let mut inputs = Vec::with_capacity(files.len());
    for f in files {
        let decode = |source| ViewFilesError::Decode {
            path: f.path.clone(),
            source,
        };
        let file = File::open(&f.path).map_err(|source| ViewFilesError::Io {
            path: f.path.clone(),
            source,
        })?;
        // With its page index, which the merged file carries over: readers
        // skip the pages of a row group that cannot hold their key.
        let meta = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Optional)
            .parse_and_finish(&file)
            .map_err(decode)?;
        if meta
            .row_groups()
            .iter()
            .any(|rg| rg.num_rows() < COPY_MIN_ROWS)
        {
            return Ok(false);
        }
        inputs.push((file, meta));
    }
    let Some((_, first)) = inputs.first() else {
        return Ok(false);
    };
    if inputs
        .iter()
        .any(|(_, m)| m.file_metadata().schema() != first.file_metadata().schema())
    {
        return Ok(false);
    }
    let root = first.file_metadata().schema_descr().root_schema_ptr();
    // A merged file holds several files' versions: never a snapshot's mark.
    let metadata = first.file_metadata().key_value_metadata().map(|kv| {
        kv.iter()
            .filter(|e| e.key != UNIQUE_KEYS)
            .cloned()
            .collect::<Vec<_>>()
    });
    let props = Arc::new(
        WriterProperties::builder()
            .set_key_value_metadata(metadata)
            .build(),
    );
    atomically(path, |tmp, file| {
        let enc = |source| ViewFilesError::Encode {
            path: tmp.to_path_buf(),
            source,
        };
        let mut writer = SerializedFileWriter::new(file, root, props).map_err(enc)?;
        for (input, meta) in &inputs {
            for (r, rg) in meta.row_groups().iter().enumerate() {
                let mut out = writer.next_row_group().map_err(enc)?;
                for (c, column) in rg.columns().iter().enumerate() {
                    let copied = ColumnCloseResult {
                        bytes_written: u64::try_from(column.compressed_size()).unwrap_or(0),
                        rows_written: u64::try_from(rg.num_rows()).unwrap_or(0),
                        metadata: column.clone(),
                        bloom_filter: None,
                        column_index: meta.column_index().and_then(|i| i.get(r)?.get(c).cloned()),
                        offset_index: meta.offset_index().and_then(|i| i.get(r)?.get(c).cloned()),
                    };
                    out.append_column(input, copied).map_err(enc)?;
                }
                out.close().map_err(enc)?;
            }
        }
        writer.into_inner().map_err(enc)
    })?;
    Ok(true)
}

/// Writes a file through `fill` at `path.tmp`, fsyncs it and renames it to
/// `path`, then fsyncs the directory. `fill` gets the temporary path (for
/// its errors) and the file, and hands the file back once written.
fn atomically(
    path: &Path,
    fill: impl FnOnce(&Path, File) -> Result<File, ViewFilesError>,
) -> Result<(), ViewFilesError> {
    let tmp = path.with_extension("parquet.tmp");
    let io = |source| ViewFilesError::Io {
        path: tmp.clone(),
        source,
    };
    let file = File::create(&tmp).map_err(io)?;
    let file = match fill(&tmp, file) {
        Ok(file) => file,
        Err(e) => {
            // Best effort: a temp file left behind is removed at recovery.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    file.sync_all().map_err(io)?;
    drop(file);
    rename_into_place(&tmp, path).map_err(io)
}

/// Rows per data page (at most, give or take a write batch of 1,024).
/// Versioned views' files are sorted by tenant (see [`sorted_by`]) and
/// carry a page index, so a query of one tenant reads the pages that can
/// hold it: a few thousand rows a row group, not the row group.
const PAGE_ROWS: usize = 4096;

/// `batch` with its rows sorted by the column `column` (ascending), so that
/// a file of it has each value's rows on a few pages. One column: sorting
/// by a whole key costs several times more and prunes no better.
pub fn sorted_by(batch: &RecordBatch, column: &str) -> Result<RecordBatch, ViewFilesError> {
    use arrow::compute::{sort_to_indices, take_record_batch};
    let Some(values) = batch.column_by_name(column) else {
        return Ok(batch.clone());
    };
    let indices = sort_to_indices(values, None, None).map_err(ViewFilesError::Sort)?;
    take_record_batch(batch, &indices).map_err(ViewFilesError::Sort)
}

/// Writes a Parquet file to `path.tmp`, fsyncs it and renames it to `path`.
pub fn write_parquet(
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<(), ViewFilesError> {
    write_parquet_with(path, schema, false, |write| {
        batches.iter().try_for_each(write)
    })
}

/// The key-value metadata entry saying that a versioned view's file holds
/// each key at most once and nothing older than it counts: a snapshot of
/// the state covering the stream from its start ([`ViewDir::replace_with_chunks`]).
/// Readers then take its rows as they are and resolve versions only
/// against the newer files (`query`), instead of over the whole table.
pub const UNIQUE_KEYS: &str = "tally.unique_keys";

/// Whether a file's metadata carries [`UNIQUE_KEYS`].
pub fn has_unique_keys(meta: &parquet::file::metadata::ParquetMetaData) -> bool {
    meta.file_metadata().key_value_metadata().is_some_and(|kv| {
        kv.iter()
            .any(|e| e.key == UNIQUE_KEYS && e.value.as_deref() == Some("true"))
    })
}

/// [`write_parquet`] with the batches handed over one at a time by `fill`,
/// marked with [`UNIQUE_KEYS`] when `unique_keys`.
fn write_parquet_with(
    path: &Path,
    schema: &SchemaRef,
    unique_keys: bool,
    fill: impl FnOnce(
        &mut dyn FnMut(&RecordBatch) -> Result<(), ViewFilesError>,
    ) -> Result<(), ViewFilesError>,
) -> Result<(), ViewFilesError> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_data_page_row_count_limit(PAGE_ROWS);
    if unique_keys {
        props = props.set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
            UNIQUE_KEYS.to_owned(),
            "true".to_owned(),
        )]));
    }
    // Unique-per-row text gains nothing from a dictionary and costs an
    // intern per value on the hot path.
    for column in ["id", "data", "subject", "last_id"] {
        props = props.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    let props = props.build();
    atomically(path, |tmp, file| {
        let enc = |source| ViewFilesError::Encode {
            path: tmp.to_path_buf(),
            source,
        };
        let mut writer =
            ArrowWriter::try_new(file, Arc::clone(schema), Some(props)).map_err(enc)?;
        fill(&mut |b: &RecordBatch| writer.write(b).map_err(enc))?;
        writer.into_inner().map_err(enc)
    })
}

/// Reads a Parquet file batch by batch (64k rows each): memory holds one
/// batch, not the file.
pub fn read_parquet(
    path: &Path,
) -> Result<impl Iterator<Item = Result<RecordBatch, ViewFilesError>> + use<>, ViewFilesError> {
    let file = File::open(path).map_err(|source| ViewFilesError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.with_batch_size(64 * 1024).build())
        .map_err(|source| ViewFilesError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    let path = path.to_path_buf();
    Ok(reader.map(move |b| {
        b.map_err(|source| ViewFilesError::Arrow {
            path: path.clone(),
            source,
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::UInt64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn a_linked_file_takes_its_range_and_a_retry_finds_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("a", DataType::UInt64, false)]));
        let live = ViewDir::new(&dir.path().join("live"), "t");
        live.create().unwrap();
        let src = live
            .write(1, 10, &schema, &[batch(&schema, &[1, 2, 3])])
            .unwrap();
        let fresh = ViewDir::new(&dir.path().join("fresh"), "t");
        fresh.create().unwrap();
        fresh.link(&src, 1, 10).unwrap();
        let linked = fresh.link(&src, 1, 10).unwrap();
        assert_eq!(
            std::fs::read(&linked).unwrap(),
            std::fs::read(&src).unwrap()
        );
        let files = fresh.files().unwrap();
        assert_eq!(
            (files.len(), files[0].first_seq, files[0].last_seq),
            (1, 1, 10)
        );
        // The live directory may drop its file (compaction): the link stays.
        std::fs::remove_file(&src).unwrap();
        let rows: usize = read_parquet(&linked)
            .unwrap()
            .map(|b| b.unwrap().num_rows())
            .sum();
        assert_eq!(rows, 3);
    }

    #[test]
    fn files_from_before_a_column_was_added_merge_with_it_as_null() {
        let dir = tempfile::tempdir().unwrap();
        let v = ViewDir::new(dir.path(), "t");
        v.create().unwrap();
        let old: SchemaRef = Arc::new(Schema::new(vec![Field::new("a", DataType::UInt64, false)]));
        let new: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("a", DataType::UInt64, false),
            Field::new("b", DataType::Utf8, true),
        ]));
        for i in 0..COMPACT_TRIGGER as u64 {
            let b = if i < 20 {
                batch(&old, &[i])
            } else {
                RecordBatch::try_new(
                    Arc::clone(&new),
                    vec![
                        Arc::new(UInt64Array::from(vec![i])),
                        Arc::new(arrow::array::StringArray::from(vec![Some("x")])),
                    ],
                )
                .unwrap()
            };
            let schema = b.schema();
            v.write(i + 1, i + 1, &schema, &[b]).unwrap();
        }
        assert_eq!(
            v.compact(&new, COMPACT_TRIGGER as u64).unwrap(),
            COMPACT_TRIGGER
        );
        let files = v.files().unwrap();
        assert_eq!(files.len(), 1);
        let rows: Vec<RecordBatch> = read_parquet(&files[0].path)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let nulls: usize = rows.iter().map(|b| b.column(1).null_count()).sum();
        assert_eq!(nulls, 20);
        assert_eq!(
            rows.iter().map(RecordBatch::num_rows).sum::<usize>(),
            COMPACT_TRIGGER
        );
    }

    /// A created view directory `t` under `dir` of one `UInt64` column `v`.
    fn u64_view(dir: &Path) -> (ViewDir, SchemaRef) {
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::UInt64, false)]));
        let v = ViewDir::new(dir, "t");
        v.create().unwrap();
        (v, schema)
    }

    fn batch(schema: &SchemaRef, vals: &[u64]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::clone(schema),
            vec![Arc::new(UInt64Array::from(vals.to_vec()))],
        )
        .unwrap()
    }

    #[test]
    fn recover_removes_orphans_and_contained_files() {
        let dir = tempfile::tempdir().unwrap();
        let (v, schema) = u64_view(dir.path());
        v.write(1, 10, &schema, &[batch(&schema, &[1])]).unwrap();
        v.write(11, 20, &schema, &[batch(&schema, &[2])]).unwrap();
        v.write(1, 20, &schema, &[batch(&schema, &[1, 2])]).unwrap(); // merged, parts not yet deleted
        v.write(21, 30, &schema, &[batch(&schema, &[3])]).unwrap(); // beyond checkpoint
        std::fs::write(v.dir.join("seq-x.parquet.tmp"), b"junk").unwrap();
        assert_eq!(ranges(&v), vec![(1, 20), (21, 30)]);
        assert_eq!(v.recover(20).unwrap(), 4);
        assert_eq!(ranges(&v), vec![(1, 20)]);
        assert_eq!(std::fs::read_dir(&v.dir).unwrap().count(), 1);
    }

    #[test]
    fn compaction_keeps_every_row_once() {
        let dir = tempfile::tempdir().unwrap();
        let (v, schema) = u64_view(dir.path());
        for i in 0..40u64 {
            v.write(i * 10 + 1, i * 10 + 10, &schema, &[batch(&schema, &[i])])
                .unwrap();
        }
        assert_eq!(v.compact(&schema, 400).unwrap(), 40);
        let files = v.files().unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(values(&files[0].path), (0..40).collect::<Vec<_>>());
    }

    fn ranges(v: &ViewDir) -> Vec<(u64, u64)> {
        v.files()
            .unwrap()
            .iter()
            .map(|f| (f.first_seq, f.last_seq))
            .collect()
    }

    fn values(path: &Path) -> Vec<u64> {
        read_parquet(path)
            .unwrap()
            .flat_map(|b| {
                let b = b.unwrap();
                b.column(0)
                    .as_any()
                    .downcast_ref::<UInt64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    #[test]
    fn a_snapshot_keeps_its_chunks_in_order_and_a_failed_chunk_leaves_the_files_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let (v, schema) = u64_view(dir.path());
        for i in 0..3u64 {
            v.write(i * 10 + 1, i * 10 + 10, &schema, &[batch(&schema, &[i])])
                .unwrap();
        }
        // A chunk fails after two were handed to the encoder.
        let chunks = (0..5u64).map(|i| {
            if i == 2 {
                Err(std::io::Error::other("state unreadable"))
            } else {
                Ok(batch(&schema, &[i * 100, i * 100 + 1]))
            }
        });
        let err = v.replace_with_chunks(30, &schema, chunks).unwrap_err();
        assert!(matches!(err, ViewFilesError::Snapshot(_)), "{err}");
        assert_eq!(ranges(&v), vec![(1, 10), (11, 20), (21, 30)]);
        assert_eq!(
            std::fs::read_dir(&v.dir).unwrap().count(),
            3,
            "no file left behind"
        );
        // A panic while building a chunk leaves them as they were too.
        let panicking = (0..5u64).map(|i| {
            assert!(i < 2, "a chunk cannot be built");
            Ok::<_, std::io::Error>(batch(&schema, &[i]))
        });
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            v.replace_with_chunks(30, &schema, panicking)
        }));
        assert!(caught.is_err());
        assert_eq!(ranges(&v), vec![(1, 10), (11, 20), (21, 30)]);
        assert_eq!(
            std::fs::read_dir(&v.dir).unwrap().count(),
            3,
            "no file left behind"
        );
        // Many chunks, in order, replace every file they cover.
        let chunks =
            (0..50u64).map(|i| Ok::<_, std::io::Error>(batch(&schema, &[2 * i, 2 * i + 1])));
        assert_eq!(v.replace_with_chunks(30, &schema, chunks).unwrap(), 3);
        let files = v.files().unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(values(&files[0].path), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn large_row_groups_are_copied_with_their_arrow_schema() {
        use arrow::array::{StringArray, TimestampMicrosecondArray};
        let dir = tempfile::tempdir().unwrap();
        let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()));
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("at", ts, false),
            Field::new("tenant", DataType::Utf8, false),
        ]));
        let v = ViewDir::new(dir.path(), "t");
        v.create().unwrap();
        let rows = COPY_MIN_ROWS as usize;
        for i in 0..33u64 {
            let at: Vec<i64> = (0..rows)
                .map(|r| (i as i64) * 1_000_000 + r as i64)
                .collect();
            let tenant: Vec<String> = (0..rows).map(|r| format!("t{}", r % 7)).collect();
            let b = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(TimestampMicrosecondArray::from(at).with_timezone("UTC")),
                    Arc::new(StringArray::from(tenant)),
                ],
            )
            .unwrap();
            v.write(i * 10 + 1, i * 10 + 10, &schema, &[b]).unwrap();
        }
        assert_eq!(v.compact(&schema, 330).unwrap(), 33);
        let files = v.files().unwrap();
        assert_eq!(files.len(), 1);
        let file = File::open(&files[0].path).unwrap();
        let meta = parquet::file::metadata::ParquetMetaDataReader::new()
            .parse_and_finish(&file)
            .unwrap();
        // Copied, not re-encoded: one row group per merged file.
        assert_eq!(meta.row_groups().len(), 33);
        let mut n = 0;
        let mut last = i64::MIN;
        for b in read_parquet(&files[0].path).unwrap() {
            let b = b.unwrap();
            assert_eq!(b.schema(), schema, "the Arrow schema (time zone) survives");
            let at = b
                .column(0)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .unwrap();
            for x in at.values() {
                assert!(*x > last, "rows in file order");
                last = *x;
            }
            n += b.num_rows();
        }
        assert_eq!(n, 33 * rows);
    }

    /// Sorted by tenant, each row group of a merged file keeps its page
    /// index with the pages where they now are: a reader selecting one
    /// tenant's pages through it gets exactly that tenant's rows.
    #[test]
    fn a_merged_file_keeps_each_row_groups_page_index() {
        use arrow::array::{Array, StringArray};
        use parquet::arrow::arrow_reader::{ArrowReaderOptions, RowSelection, RowSelector};
        use parquet::file::metadata::PageIndexPolicy;
        use parquet::file::page_index::column_index::ColumnIndexMetaData;
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("tenant", DataType::Utf8, false),
            Field::new("n", DataType::UInt64, false),
        ]));
        let v = ViewDir::new(dir.path(), "t");
        v.create().unwrap();
        let rows = 4 * PAGE_ROWS;
        for i in 0..3u64 {
            // 50 tenants, interleaved as operators cut them.
            let tenant: Vec<String> = (0..rows).map(|r| format!("t{:02}", r % 50)).collect();
            let n: Vec<u64> = (0..rows as u64).map(|r| i * 1_000_000 + r).collect();
            let b = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringArray::from(tenant)),
                    Arc::new(UInt64Array::from(n)),
                ],
            )
            .unwrap();
            let b = sorted_by(&b, "tenant").unwrap();
            v.write(i * 10 + 1, i * 10 + 10, &schema, &[b]).unwrap();
        }
        // Three files are not enough to merge on their own: merge them as a
        // compaction would.
        let files = v.files().unwrap();
        let refs: Vec<&ViewFile> = files.iter().collect();
        let merged = dir.path().join("merged.parquet");
        assert!(copy_row_groups(&merged, &refs).unwrap());
        let file = File::open(&merged).unwrap();
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(
            file.try_clone().unwrap(),
            options,
        )
        .unwrap();
        let meta = Arc::clone(builder.metadata());
        assert_eq!(meta.row_groups().len(), 3);
        let (Some(index), Some(offsets)) = (meta.column_index(), meta.offset_index()) else {
            panic!("the merged file has no page index");
        };
        // The pages of each row group whose tenant range holds t07.
        let mut selectors = Vec::new();
        for (rg, meta_rg) in meta.row_groups().iter().enumerate() {
            let ColumnIndexMetaData::BYTE_ARRAY(pages) = &index[rg][0] else {
                panic!("tenant pages have no byte-array index");
            };
            let locations = offsets[rg][0].page_locations();
            assert!(locations.len() >= 4, "{} pages", locations.len());
            for (p, loc) in locations.iter().enumerate() {
                let end = locations
                    .get(p + 1)
                    .map_or(meta_rg.num_rows(), |l| l.first_row_index);
                let count = (end - loc.first_row_index) as usize;
                let (min, max) = (pages.min_value(p).unwrap(), pages.max_value(p).unwrap());
                let holds = min <= b"t07".as_slice() && b"t07".as_slice() <= max;
                selectors.push(if holds {
                    RowSelector::select(count)
                } else {
                    RowSelector::skip(count)
                });
            }
        }
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(
            file,
            ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required),
        )
        .unwrap()
        .with_row_selection(RowSelection::from(selectors))
        .build()
        .unwrap();
        let mut read = 0;
        let mut t07 = 0;
        for b in reader {
            let b = b.unwrap();
            let tenant = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            read += b.num_rows();
            t07 += (0..tenant.len())
                .filter(|r| tenant.value(*r) == "t07")
                .count();
        }
        assert_eq!(t07, 3 * (0..rows).filter(|r| r % 50 == 7).count());
        assert!(read < 3 * rows / 2, "read {read} of {} rows", 3 * rows);
    }
}
