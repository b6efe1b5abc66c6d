//! A stored view's table: exactly the Parquet files one checkpoint covers,
//! and an error (never fewer rows) when one of them has vanished.
//!
//! DataFusion's `ListingTable` asks the object store for each file by name
//! when it plans a scan and, if the file is gone, lists the name as a
//! prefix instead, which finds nothing: a file compacted away between the
//! checkpoint's listing and the scan would silently drop its rows. So after
//! the listing table has planned its scan, every file is checked to still
//! exist; a missing one is an object-store `NotFound`, which
//! [`super::Session::query`] answers by reopening on the newer checkpoint.
//! A file removed after that check fails its read with `NotFound` too. The
//! same holds for the objects of an `s3://` location (a HEAD each).

use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::catalog::{ScanArgs, ScanResult, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::ListingTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};

/// One file of a checkpoint.
#[derive(Debug, Clone)]
pub enum FileRef {
    Local {
        url: String,
        path: PathBuf,
    },
    Remote {
        url: String,
        store: Arc<dyn ObjectStore>,
        path: ObjPath,
    },
}

impl FileRef {
    /// The URL DataFusion reads it by.
    pub fn url(&self) -> &str {
        match self {
            FileRef::Local { url, .. } | FileRef::Remote { url, .. } => url,
        }
    }

    /// Whether the file is a snapshot holding each key once
    /// ([`crate::store::parquet::UNIQUE_KEYS`]). Reads its footer; a file
    /// that cannot be read is taken as not marked (the scan then says why).
    pub async fn unique_keys(&self) -> bool {
        use parquet::errors::ParquetError;
        use parquet::file::metadata::ParquetMetaDataReader;
        match self {
            FileRef::Local { path, .. } => crate::store::parquet::has_unique_keys_file(path),
            FileRef::Remote { store, path, .. } => {
                // The footer is usually within the last 64 KiB: one request,
                // and a second when it is longer.
                let mut want = 64 << 10;
                for _ in 0..2 {
                    let options = object_store::GetOptions {
                        range: Some(object_store::GetRange::Suffix(want)),
                        ..Default::default()
                    };
                    let Ok(got) = store.get_opts(path, options).await else {
                        return false;
                    };
                    let size = got.meta.size;
                    let Ok(bytes) = got.bytes().await else {
                        return false;
                    };
                    let mut reader = ParquetMetaDataReader::new();
                    match reader.try_parse_sized(&bytes, size) {
                        Ok(()) => {
                            return reader
                                .finish()
                                .is_ok_and(|m| crate::store::parquet::has_unique_keys(&m));
                        }
                        Err(ParquetError::NeedMoreData(needed)) => {
                            want = u64::try_from(needed).unwrap_or(u64::MAX);
                        }
                        Err(_) => return false,
                    }
                }
                false
            }
        }
    }

    /// `NotFound` if the file is gone.
    async fn check(&self) -> Result<()> {
        let gone = |path: String, source: Box<dyn std::error::Error + Send + Sync>| {
            DataFusionError::ObjectStore(Box::new(object_store::Error::NotFound { path, source }))
        };
        match self {
            FileRef::Local { path, .. } => match std::fs::metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(gone(path.display().to_string(), Box::new(e)))
                }
                _ => Ok(()),
            },
            FileRef::Remote { store, path, .. } => match store.head(path).await {
                Err(object_store::Error::NotFound { path, source }) => Err(gone(path, source)),
                Err(e) => Err(DataFusionError::ObjectStore(Box::new(e))),
                Ok(_) => Ok(()),
            },
        }
    }
}

#[derive(Debug)]
pub struct CheckpointFiles {
    inner: ListingTable,
    files: Vec<FileRef>,
}

impl CheckpointFiles {
    pub fn new(inner: ListingTable, files: Vec<FileRef>) -> CheckpointFiles {
        CheckpointFiles { inner, files }
    }

    /// Fails with `NotFound` if a file of the checkpoint is gone. A name
    /// stands for one range of the stream and is not reused for other rows
    /// (a replay switch can bring back a name, with the same range's rows;
    /// an object's name carries its writer), so a file present now was
    /// there when the listing table looked it up.
    async fn check_files(&self) -> Result<()> {
        for f in &self.files {
            f.check().await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl TableProvider for CheckpointFiles {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn constraints(&self) -> Option<&datafusion::common::Constraints> {
        self.inner.constraints()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = self.inner.scan(state, projection, filters, limit).await?;
        self.check_files().await?;
        Ok(plan)
    }

    async fn scan_with_args<'a>(
        &self,
        state: &dyn Session,
        args: ScanArgs<'a>,
    ) -> Result<ScanResult> {
        let result = self.inner.scan_with_args(state, args).await?;
        self.check_files().await?;
        Ok(result)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }
}
