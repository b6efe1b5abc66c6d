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
//! A file removed after that check fails its read with `NotFound` too.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::catalog::{ScanArgs, ScanResult, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::ListingTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

#[derive(Debug)]
pub struct CheckpointFiles {
    inner: ListingTable,
    files: Vec<PathBuf>,
}

impl CheckpointFiles {
    pub fn new(inner: ListingTable, files: Vec<PathBuf>) -> CheckpointFiles {
        CheckpointFiles { inner, files }
    }

    /// Fails with `NotFound` if a file of the checkpoint is gone. A name
    /// stands for one range of the stream and is not reused for other rows
    /// (a replay switch can bring back a name, with the same range's rows),
    /// so a file present now was there when the listing table looked it up.
    fn check_files(&self) -> Result<()> {
        for f in &self.files {
            if let Err(e) = std::fs::metadata(f)
                && e.kind() == std::io::ErrorKind::NotFound
            {
                return Err(DataFusionError::ObjectStore(Box::new(
                    datafusion::object_store::Error::NotFound {
                        path: f.display().to_string(),
                        source: Box::new(e),
                    },
                )));
            }
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
        self.check_files()?;
        Ok(plan)
    }

    async fn scan_with_args<'a>(
        &self,
        state: &dyn Session,
        args: ScanArgs<'a>,
    ) -> Result<ScanResult> {
        let result = self.inner.scan_with_args(state, args).await?;
        self.check_files()?;
        Ok(result)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }
}
