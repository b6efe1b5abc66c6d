//! Bounds on what one aggregate may hold and hand out.
//!
//! DataFusion's `string_agg` and `array_agg` keep every value they are
//! given, and as window functions (`string_agg(s, ',') OVER (ORDER BY
//! x)`) hand out the whole accumulation again at every row: one account's
//! query grew the server by 250 MB a second, past `--memory-limit`, and
//! its operators take no memory from the pool until a batch is done, so
//! nothing stopped it. [`BoundedAggregate`] wraps those aggregates (and
//! `median` and `percentile_cont`, which keep every value too): their
//! accumulators are fed at most [`SLICE_ROWS`] rows at a time and refuse
//! (a [`super::TooLarge`], SQLSTATE 53200) once they hold more than
//! [`MAX_ACCUMULATOR_BYTES`], or once what they handed out passes it.

use std::any::Any;
use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, FieldRef};
use datafusion::common::ScalarValue;
use datafusion::error::Result;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::expr::{
    AggregateFunction, AggregateFunctionParams, WindowFunctionParams,
};
use datafusion::logical_expr::function::{
    AccumulatorArgs, AggregateFunctionSimplification, StateFieldsArgs,
};
use datafusion::logical_expr::udf_eq::UdfEq;
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, Expr, GroupsAccumulator,
    ReversedUDAF, SetMonotonicity, Signature, StatisticsArgs,
};
use datafusion::logical_expr_common::operator::Operator;

use super::too_large;

/// The aggregates that keep every value they are given.
const WRAPPED: &[&str] = &["string_agg", "array_agg", "median", "percentile_cont"];

/// The most one accumulator may hold, and hand out over its life (a
/// window function evaluates it once per row).
pub const MAX_ACCUMULATOR_BYTES: usize = 256 << 20;

/// Rows given to an accumulator at once, so that one batch of large
/// values is refused part of the way through instead of after it.
pub const SLICE_ROWS: usize = 256;

/// Wraps the aggregates of [`WRAPPED`] registered on `ctx` in
/// [`BoundedAggregate`].
pub fn bound_aggregates(ctx: &SessionContext) {
    let functions: Vec<Arc<AggregateUDF>> = ctx
        .state()
        .aggregate_functions()
        .values()
        .cloned()
        .collect();
    let mut seen = std::collections::HashSet::new();
    for f in functions {
        let name = f.name().to_owned();
        if !WRAPPED.contains(&name.as_str())
            || !seen.insert(name)
            || (f.inner().as_ref() as &dyn Any).is::<BoundedAggregate>()
        {
            continue;
        }
        ctx.register_udaf(AggregateUDF::new_from_shared_impl(Arc::new(
            BoundedAggregate::new(Arc::clone(f.inner())),
        )));
    }
}

/// An aggregate whose accumulators are [`BoundedAccumulator`]s. It
/// declines the grouped accumulator (which has no per-group size to
/// check); everything else is the inner aggregate's.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct BoundedAggregate {
    inner: UdfEq<Arc<dyn AggregateUDFImpl>>,
}

impl BoundedAggregate {
    pub fn new(inner: Arc<dyn AggregateUDFImpl>) -> BoundedAggregate {
        BoundedAggregate {
            inner: inner.into(),
        }
    }
}

impl AggregateUDFImpl for BoundedAggregate {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }
    fn schema_name(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner.schema_name(params)
    }
    fn human_display(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner.human_display(params)
    }
    fn window_function_schema_name(&self, params: &WindowFunctionParams) -> Result<String> {
        self.inner.window_function_schema_name(params)
    }
    fn display_name(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner.display_name(params)
    }
    fn window_function_display_name(&self, params: &WindowFunctionParams) -> Result<String> {
        self.inner.window_function_display_name(params)
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }
    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        self.inner.return_field(arg_fields)
    }
    fn is_nullable(&self) -> bool {
        self.inner.is_nullable()
    }
    fn accumulator(&self, acc_args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let inner = self.inner.accumulator(acc_args)?;
        Ok(Box::new(BoundedAccumulator::new(self.name(), inner)))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        self.inner.state_fields(args)
    }
    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        false
    }
    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        self.inner.create_groups_accumulator(args)
    }
    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let inner = self.inner.create_sliding_accumulator(args)?;
        Ok(Box::new(BoundedAccumulator::new(self.name(), inner)))
    }
    fn with_beneficial_ordering(
        self: Arc<Self>,
        beneficial_ordering: bool,
    ) -> Result<Option<Arc<dyn AggregateUDFImpl>>> {
        let inner = Arc::clone(&self.inner);
        Ok(inner
            .with_beneficial_ordering(beneficial_ordering)?
            .map(|f| Arc::new(BoundedAggregate::new(f)) as Arc<dyn AggregateUDFImpl>))
    }
    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.inner.order_sensitivity()
    }
    fn simplify(&self) -> Option<AggregateFunctionSimplification> {
        self.inner.simplify()
    }
    fn simplify_expr_op_literal(
        &self,
        agg_function: &AggregateFunction,
        arg: &Expr,
        op: Operator,
        lit: &Expr,
        arg_is_left: bool,
    ) -> Result<Option<Expr>> {
        self.inner
            .simplify_expr_op_literal(agg_function, arg, op, lit, arg_is_left)
    }
    fn reverse_expr(&self) -> ReversedUDAF {
        match self.inner.reverse_expr() {
            ReversedUDAF::Reversed(f) => {
                ReversedUDAF::Reversed(Arc::new(AggregateUDF::new_from_shared_impl(Arc::new(
                    BoundedAggregate::new(Arc::clone(f.inner())),
                ))))
            }
            other => other,
        }
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn is_descending(&self) -> Option<bool> {
        self.inner.is_descending()
    }
    fn value_from_stats(&self, statistics_args: &StatisticsArgs) -> Option<ScalarValue> {
        self.inner.value_from_stats(statistics_args)
    }
    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.inner.default_value(data_type)
    }
    fn supports_null_handling_clause(&self) -> bool {
        self.inner.supports_null_handling_clause()
    }
    fn supports_within_group_clause(&self) -> bool {
        self.inner.supports_within_group_clause()
    }
    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.inner.set_monotonicity(data_type)
    }
}

/// An accumulator fed in slices, refused past [`MAX_ACCUMULATOR_BYTES`]
/// held or handed out.
#[derive(Debug)]
pub struct BoundedAccumulator {
    function: String,
    inner: Box<dyn Accumulator>,
    /// Bytes of the values `evaluate` returned so far.
    handed_out: usize,
}

impl BoundedAccumulator {
    fn new(function: &str, inner: Box<dyn Accumulator>) -> BoundedAccumulator {
        BoundedAccumulator {
            function: function.to_owned(),
            inner,
            handed_out: 0,
        }
    }

    fn check(&self) -> Result<()> {
        let held = self.inner.size();
        if held > MAX_ACCUMULATOR_BYTES {
            return Err(too_large(
                &self.function,
                format!(
                    "it would hold over {} MiB of values; aggregate fewer or shorter values",
                    MAX_ACCUMULATOR_BYTES >> 20
                ),
            ));
        }
        if self.handed_out > MAX_ACCUMULATOR_BYTES {
            return Err(too_large(
                &self.function,
                format!(
                    "its results would take over {} MiB; as a window function, partition it (PARTITION BY) or aggregate fewer values",
                    MAX_ACCUMULATOR_BYTES >> 20
                ),
            ));
        }
        Ok(())
    }

    /// `f` over `values` in slices of [`SLICE_ROWS`], checked after each.
    fn sliced(
        &mut self,
        values: &[ArrayRef],
        f: impl Fn(&mut dyn Accumulator, &[ArrayRef]) -> Result<()>,
    ) -> Result<()> {
        let rows = values.first().map_or(0, |v| v.len());
        if rows <= SLICE_ROWS {
            f(self.inner.as_mut(), values)?;
            return self.check();
        }
        let mut offset = 0;
        while offset < rows {
            let len = SLICE_ROWS.min(rows - offset);
            let slice: Vec<ArrayRef> = values.iter().map(|v| v.slice(offset, len)).collect();
            f(self.inner.as_mut(), &slice)?;
            self.check()?;
            offset += len;
        }
        Ok(())
    }
}

impl Accumulator for BoundedAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.sliced(values, |a, v| a.update_batch(v))
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        let value = self.inner.evaluate()?;
        self.handed_out = self.handed_out.saturating_add(value.size());
        self.check()?;
        Ok(value)
    }
    fn size(&self) -> usize {
        self.inner.size() + std::mem::size_of::<Self>()
            - std::mem::size_of::<Box<dyn Accumulator>>()
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.inner.state()
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.sliced(states, |a, v| a.merge_batch(v))
    }
    fn retract_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.inner.retract_batch(values)
    }
    fn supports_retract_batch(&self) -> bool {
        self.inner.supports_retract_batch()
    }
}
