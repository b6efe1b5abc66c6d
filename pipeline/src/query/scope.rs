//! Tenant scoping below SQL: a stored view as one account sees it.
//!
//! [`ScopedTable`] wraps a view's table and keeps only the rows whose
//! `tenant` is one of the account's, in an operator of its own
//! ([`ScopeExec`]) directly above the scan. It takes no filter from the
//! query, and no filter of the query passes below it, so no expression
//! the user writes (one that fails on a value, a division by zero used as
//! an oracle, row-group pruning on the user's predicate) is ever evaluated
//! on another tenant's row; the table reports no statistics either, so no
//! count is answered from the files' metadata.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, StringArray, StringViewArray};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::StreamExt;

/// The world a session sees. A scoped session's stored views (and their
/// hidden version tables) hold only the rows of its tenants: each is
/// registered as a [`scope::ScopedTable`] over the checkpoint's files, and
/// the unfiltered files are not registered under any name, so no SQL can
/// reach another tenant's rows, or evaluate anything on them; the
/// `queries/` views are then computed over the scoped views.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    #[default]
    AllTenants,
    /// Sorted and without duplicates.
    Tenants(Vec<String>),
}

impl Scope {
    pub fn tenants(mut tenants: Vec<String>) -> Scope {
        tenants.sort();
        tenants.dedup();
        Scope::Tenants(tenants)
    }

    /// Whether rows of `tenant` are visible.
    pub fn sees(&self, tenant: &str) -> bool {
        match self {
            Scope::AllTenants => true,
            Scope::Tenants(t) => t.binary_search_by(|x| x.as_str().cmp(tenant)).is_ok(),
        }
    }
}

/// The column every stored view is scoped by.
pub const TENANT: &str = "tenant";

/// A table that holds only the rows of some tenants.
#[derive(Debug)]
pub struct ScopedTable {
    inner: Arc<dyn TableProvider>,
    tenants: Arc<HashSet<String>>,
}

impl ScopedTable {
    pub fn new(inner: Arc<dyn TableProvider>, tenants: &[String]) -> ScopedTable {
        ScopedTable {
            inner,
            tenants: Arc::new(tenants.iter().cloned().collect()),
        }
    }
}

#[async_trait]
impl TableProvider for ScopedTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = self.inner.schema();
        let tenant = schema
            .index_of(TENANT)
            .map_err(|_| DataFusionError::Plan("a scoped view has no tenant column".into()))?;
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..schema.fields().len()).collect(),
        };
        // The inner scan reads what is asked for, and the tenant column.
        let mut read = wanted.clone();
        if !read.contains(&tenant) {
            read.push(tenant);
        }
        let scan = self.inner.scan(state, Some(&read), &[], None).await?;
        let position = |c: usize| read.iter().position(|&r| r == c).unwrap_or_default();
        let keep: Vec<usize> = wanted.iter().map(|&c| position(c)).collect();
        Ok(Arc::new(ScopeExec::new(
            scan,
            position(tenant),
            keep,
            Arc::clone(&self.tenants),
        )?))
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
    }
}

/// Keeps the rows of the scope's tenants, then the asked-for columns.
#[derive(Debug)]
pub struct ScopeExec {
    input: Arc<dyn ExecutionPlan>,
    tenant: usize,
    keep: Vec<usize>,
    tenants: Arc<HashSet<String>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl ScopeExec {
    fn new(
        input: Arc<dyn ExecutionPlan>,
        tenant: usize,
        keep: Vec<usize>,
        tenants: Arc<HashSet<String>>,
    ) -> Result<ScopeExec> {
        let schema = Arc::new(input.schema().project(&keep)?);
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(input.properties().partitioning.partition_count()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(ScopeExec {
            input,
            tenant,
            keep,
            tenants,
            schema,
            properties,
        })
    }
}

impl DisplayAs for ScopeExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ScopeExec: tenants={}", self.tenants.len())
    }
}

/// Which rows of `batch` belong to `tenants`.
fn mask(batch: &RecordBatch, tenant: usize, tenants: &HashSet<String>) -> Result<BooleanArray> {
    let column = batch.column(tenant);
    let sees = |v: Option<&str>| Some(v.is_some_and(|t| tenants.contains(t)));
    if let Some(a) = column.as_any().downcast_ref::<StringArray>() {
        Ok(a.iter().map(sees).collect())
    } else if let Some(a) = column.as_any().downcast_ref::<StringViewArray>() {
        Ok(a.iter().map(sees).collect())
    } else {
        Err(DataFusionError::Internal(format!(
            "the tenant column is {}, not text",
            column.data_type()
        )))
    }
}

impl ExecutionPlan for ScopeExec {
    fn name(&self) -> &str {
        "ScopeExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children)
            .map_err(|_| DataFusionError::Internal("ScopeExec has one child".into()))?;
        Ok(Arc::new(ScopeExec::new(
            input,
            self.tenant,
            self.keep.clone(),
            Arc::clone(&self.tenants),
        )?))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let (tenant, keep, tenants) = (self.tenant, self.keep.clone(), Arc::clone(&self.tenants));
        let stream = input.map(move |batch| {
            let batch = batch?;
            let rows = mask(&batch, tenant, &tenants)?;
            let kept = arrow::compute::filter_record_batch(&batch, &rows)?;
            Ok(kept.project(&keep)?)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        )))
    }
}
