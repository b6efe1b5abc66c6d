//! Bounds on what one function call may allocate.
//!
//! DataFusion's functions allocate their whole result before anything can
//! look at it, outside the memory pool: `array_repeat(1, 2147483647)` asks
//! for 16 GiB while the planner folds the constant, and the process dies.
//! Every scalar function a session registers is therefore wrapped in
//! [`Bounded`], which, before it calls the function:
//!
//! - predicts the output of the functions whose output can be far larger
//!   than their arguments (`repeat`, `lpad`, `array_repeat`, `range`,
//!   `replace`, ...: [`predicted`]) and refuses a call whose output would
//!   pass [`MAX_VALUE_BYTES`] in one row or [`MAX_CALL_BYTES`] in all;
//! - refuses arguments larger than [`MAX_INPUT_BYTES`] in all (a literal
//!   argument counts once per row it is combined with);
//! - refuses the quadratic `levenshtein` past [`MAX_PAIR_WORK`];
//!
//! and after it, refuses an output over [`MAX_CALL_BYTES`]. The remaining
//! functions return at most a small multiple of their arguments, so with
//! these three checks no call allocates more than a few times
//! [`MAX_INPUT_BYTES`]. A return type with a fixed size over
//! [`MAX_FIXED_SIZE`] (`arrow_cast(x, 'FixedSizeList(...)')`) is refused
//! when the call is planned. The refusal is a [`TooLarge`] error, which a
//! session reports as over budget (SQLSTATE 53200). The aggregates that
//! keep every value are bounded the same way in [`aggregate`].

pub mod aggregate;

use std::any::Any;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, FieldRef, Int64Type, IntervalMonthDayNanoType, TimeUnit,
};
use datafusion::common::config::ConfigOptions;
use datafusion::common::{ExprSchema, ScalarValue};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::preimage::PreimageResult;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::udf_eq::UdfEq;
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ExpressionPlacement, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, StructFieldMapping,
};

/// The largest value one row of a function's output may hold.
pub const MAX_VALUE_BYTES: u64 = 1 << 20;

/// The largest output of one call (one batch of rows, or one constant).
pub const MAX_CALL_BYTES: u64 = 64 << 20;

/// The most argument bytes one call takes (a literal counts once per row).
pub const MAX_INPUT_BYTES: u64 = 256 << 20;

/// The largest fixed size of a list or binary type a query may build.
pub const MAX_FIXED_SIZE: i32 = 4096;

/// Character comparisons `levenshtein` may make for one row, and per call.
pub const MAX_PAIR_WORK: u64 = 100_000_000;
const MAX_CALL_WORK: u64 = 1_000_000_000;

/// Functions left unwrapped: the planner and optimizer recognise them by
/// their concrete type (struct field access, `log`/`power` rewrites, file
/// metadata columns), and none of them amplifies its arguments.
const UNWRAPPED: &[&str] = &[
    "get_field",
    "named_struct",
    "struct",
    "log",
    "power",
    "input_file_name",
    "file_row_index",
];

/// A function call refused because of what it would allocate or cost.
#[derive(Debug, thiserror::Error)]
#[error("{function}: {what}")]
pub struct TooLarge {
    pub function: String,
    pub what: String,
}

fn too_large(function: &str, what: String) -> DataFusionError {
    DataFusionError::External(Box::new(TooLarge {
        function: function.to_owned(),
        what,
    }))
}

/// Wraps every scalar function registered on `ctx` in [`Bounded`], and
/// the aggregates that keep every value in [`aggregate::BoundedAggregate`].
pub fn bound_functions(ctx: &SessionContext) {
    aggregate::bound_aggregates(ctx);
    let functions: Vec<Arc<ScalarUDF>> = ctx.state().scalar_functions().values().cloned().collect();
    let mut seen = std::collections::HashSet::new();
    for f in functions {
        let name = f.name().to_owned();
        if UNWRAPPED.contains(&name.as_str())
            || !seen.insert(name)
            || (f.inner().as_ref() as &dyn Any).is::<Bounded>()
        {
            continue;
        }
        ctx.register_udf(ScalarUDF::new_from_impl(Bounded::new(Arc::clone(
            f.inner(),
        ))));
    }
}

/// A scalar function with the bounds of this module. Everything but
/// [`ScalarUDFImpl::invoke_with_args`] and the return field is the inner
/// function's.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Bounded {
    inner: UdfEq<Arc<dyn ScalarUDFImpl>>,
}

impl Bounded {
    pub fn new(inner: Arc<dyn ScalarUDFImpl>) -> Bounded {
        Bounded {
            inner: inner.into(),
        }
    }
}

#[allow(deprecated)]
impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.display_name(args)
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let t = self.inner.return_type(arg_types)?;
        check_type(self.name(), &t)?;
        Ok(t)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let f = self.inner.return_field_from_args(args)?;
        check_type(self.name(), f.data_type())?;
        Ok(f)
    }

    fn is_nullable(&self, args: &[Expr], schema: &dyn ExprSchema) -> bool {
        self.inner.is_nullable(args, schema)
    }

    fn is_strict(&self) -> bool {
        self.inner.is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let name = self.name().to_owned();
        check_inputs(&name, &args)?;
        let out = self.inner.invoke_with_args(args)?;
        let bytes = match &out {
            ColumnarValue::Array(a) => a.get_array_memory_size() as u64,
            ColumnarValue::Scalar(s) => s.size() as u64,
        };
        let limit = match &out {
            ColumnarValue::Array(_) => MAX_CALL_BYTES,
            ColumnarValue::Scalar(_) => MAX_VALUE_BYTES,
        };
        if bytes > limit {
            return Err(too_large(
                &name,
                format!("its result would take {bytes} bytes, over the {limit} one call may make"),
            ));
        }
        Ok(out)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        self.inner
            .with_updated_config(config)
            .map(|f| ScalarUDF::new_from_impl(Bounded::new(Arc::clone(f.inner()))))
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &SimplifyContext,
    ) -> Result<PreimageResult> {
        self.inner.preimage(args, lit_expr, info)
    }

    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.conditional_arguments(args)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &Interval,
        inputs: &[&Interval],
    ) -> Result<Option<Vec<Interval>>> {
        self.inner.propagate_constraints(interval, inputs)
    }

    fn struct_field_mapping(
        &self,
        literal_args: &[Option<ScalarValue>],
    ) -> Option<StructFieldMapping> {
        self.inner.struct_field_mapping(literal_args)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.placement(args)
    }
}

/// Refuses a type with a fixed size over [`MAX_FIXED_SIZE`], at any depth.
pub fn check_type(function: &str, t: &DataType) -> Result<()> {
    match t {
        DataType::FixedSizeList(f, n) => {
            if *n > MAX_FIXED_SIZE {
                return Err(too_large(
                    function,
                    format!("a list of fixed size {n} is over the {MAX_FIXED_SIZE} allowed"),
                ));
            }
            check_type(function, f.data_type())
        }
        DataType::FixedSizeBinary(n) if *n > MAX_FIXED_SIZE => Err(too_large(
            function,
            format!("a binary of fixed size {n} is over the {MAX_FIXED_SIZE} allowed"),
        )),
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::Map(f, _) => check_type(function, f.data_type()),
        DataType::Struct(fields) => fields
            .iter()
            .try_for_each(|f| check_type(function, f.data_type())),
        DataType::Dictionary(_, v) => check_type(function, v),
        _ => Ok(()),
    }
}

/// The arguments of one call, row by row, without expanding literals.
struct Args<'a> {
    args: &'a [ColumnarValue],
    rows: usize,
}

impl Args<'_> {
    fn arg(&self, i: usize) -> Option<&ColumnarValue> {
        self.args.get(i)
    }

    /// Rows the call computes: one for all-literal arguments.
    fn rows(&self) -> usize {
        if self
            .args
            .iter()
            .any(|a| matches!(a, ColumnarValue::Array(_)))
        {
            self.rows
        } else {
            1
        }
    }

    /// Argument `i` cast through `types` in turn, per row (a literal in
    /// every row; `None` in a row: null). `None` when the argument is
    /// absent or does not cast.
    fn cast_per_row<T: ArrowPrimitiveType>(
        &self,
        i: usize,
        types: &[DataType],
    ) -> Option<Vec<Option<T::Native>>> {
        let array = match self.arg(i)? {
            ColumnarValue::Scalar(s) => s.to_array_of_size(1).ok()?,
            ColumnarValue::Array(a) => Arc::clone(a),
        };
        let cast = types
            .iter()
            .try_fold(array, |a, t| arrow::compute::cast(&a, t).ok())?;
        let values = cast.as_primitive::<T>();
        Some(
            (0..self.rows())
                .map(|r| {
                    let r = if values.len() == 1 { 0 } else { r };
                    (r < values.len() && values.is_valid(r)).then(|| values.value(r))
                })
                .collect(),
        )
    }

    /// Argument `i` as whole numbers per row (`None`: null, absent or not
    /// a number).
    fn ints(&self, i: usize) -> Vec<Option<i64>> {
        self.cast_per_row::<Int64Type>(i, &[DataType::Int64])
            .unwrap_or_else(|| vec![None; self.rows()])
    }

    /// Bytes of argument `i`'s value in each row: the length of a string
    /// or binary, the elements of a list times 16, else 16.
    fn lens(&self, i: usize) -> Vec<u64> {
        let rows = self.rows();
        let Some(arg) = self.arg(i) else {
            return vec![0; rows];
        };
        let array: ArrayRef = match arg {
            ColumnarValue::Scalar(s) => match s.to_array_of_size(1) {
                Ok(a) => a,
                Err(_) => return vec![s.size() as u64; rows],
            },
            ColumnarValue::Array(a) => Arc::clone(a),
        };
        let per_element = match array.data_type() {
            DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(..)
            | DataType::ListView(_)
            | DataType::LargeListView(_) => 16,
            _ => 1,
        };
        let lengths = arrow::compute::kernels::length::length(&array)
            .ok()
            .and_then(|l| arrow::compute::cast(&l, &DataType::Int64).ok());
        (0..rows)
            .map(|r| {
                let r = if array.len() == 1 { 0 } else { r };
                match &lengths {
                    Some(l) => {
                        let l = l.as_primitive::<Int64Type>();
                        if r < l.len() && l.is_valid(r) {
                            (l.value(r).max(0) as u64).saturating_mul(per_element)
                        } else {
                            0
                        }
                    }
                    None => 16,
                }
            })
            .collect()
    }
}

/// Refuses a call whose arguments, or whose predicted output, are over the
/// bounds of this module.
fn check_inputs(name: &str, call: &ScalarFunctionArgs) -> Result<()> {
    let args = Args {
        args: &call.args,
        rows: call.number_rows,
    };
    let rows = args.rows() as u64;
    let input: u64 = call
        .args
        .iter()
        .map(|a| match a {
            ColumnarValue::Array(a) => a.get_array_memory_size() as u64,
            ColumnarValue::Scalar(s) => (s.size() as u64).saturating_mul(rows),
        })
        .fold(0u64, u64::saturating_add);
    if input > MAX_INPUT_BYTES {
        return Err(too_large(
            name,
            format!(
                "its arguments take {input} bytes for {rows} rows, over the {MAX_INPUT_BYTES} one call may take (a literal counts once per row)"
            ),
        ));
    }
    if name == "levenshtein" {
        let (a, b) = (args.lens(0), args.lens(1));
        let steps = a.iter().zip(&b).map(|(x, y)| x.saturating_mul(*y));
        return check_costs(
            name,
            steps,
            MAX_PAIR_WORK,
            MAX_CALL_WORK,
            "comparison steps",
        );
    }
    let Some(per_row) = predicted(name, &args) else {
        return Ok(());
    };
    check_costs(
        name,
        per_row,
        MAX_VALUE_BYTES,
        MAX_CALL_BYTES,
        "bytes of result",
    )
}

/// Refuses a call one of whose rows costs more than `per_row`, or whose
/// rows together cost more than `per_call` (`what` names the cost).
fn check_costs(
    name: &str,
    costs: impl IntoIterator<Item = u64>,
    per_row: u64,
    per_call: u64,
    what: &str,
) -> Result<()> {
    let mut total = 0u64;
    for cost in costs {
        if cost > per_row {
            return Err(too_large(
                name,
                format!("one row needs {cost} {what}, over the {per_row} allowed per row"),
            ));
        }
        total = total.saturating_add(cost);
    }
    if total > per_call {
        return Err(too_large(
            name,
            format!("the call needs {total} {what}, over the {per_call} allowed per call"),
        ));
    }
    Ok(())
}

/// Output bytes per row of the functions whose output can be far larger
/// than their arguments; `None` for the others.
fn predicted(name: &str, args: &Args<'_>) -> Option<Vec<u64>> {
    let n = |i: usize| -> Vec<u64> {
        args.ints(i)
            .into_iter()
            .map(|v| v.unwrap_or(0).max(0) as u64)
            .collect()
    };
    let zip = |a: Vec<u64>, b: Vec<u64>, f: &dyn Fn(u64, u64) -> u64| -> Vec<u64> {
        a.into_iter().zip(b).map(|(x, y)| f(x, y)).collect()
    };
    Some(match name {
        "repeat" => zip(args.lens(0), n(1), &|len, n| len.saturating_mul(n)),
        // A character takes at most four bytes.
        "lpad" | "rpad" => n(1).into_iter().map(|n| n.saturating_mul(4)).collect(),
        "array_repeat" => zip(args.lens(0), n(1), &|len, n| {
            len.max(8).saturating_add(8).saturating_mul(n)
        }),
        "array_resize" => zip(args.lens(2), n(1), &|len, n| {
            len.max(16).saturating_add(8).saturating_mul(n)
        }),
        "range" | "generate_series" => series_lengths(args)
            .into_iter()
            .map(|n| n.saturating_mul(16))
            .collect(),
        "replace" => {
            let (s, from, to) = (args.lens(0), args.lens(1), args.lens(2));
            s.iter()
                .zip(from)
                .zip(to)
                .map(|((s, from), to)| {
                    if to <= from {
                        *s
                    } else {
                        // An empty pattern matches between every two characters.
                        let matches = s / from.max(1) + 1;
                        s.saturating_add(matches.saturating_mul(to))
                    }
                })
                .collect()
        }
        "regexp_replace" => {
            // At most one match per position (an empty match included),
            // and the replacement's group references repeat the input.
            zip(args.lens(0), args.lens(2), &|s, rep| {
                (s + 1)
                    .saturating_mul(rep + 1)
                    .saturating_add(s.saturating_mul(rep))
            })
        }
        "to_char" | "date_format" => args
            .lens(1)
            .into_iter()
            .map(|fmt| fmt.saturating_mul(16).saturating_add(64))
            .collect(),
        "string_to_array" | "string_to_list" => args
            .lens(0)
            .into_iter()
            .map(|s| s.saturating_mul(24).saturating_add(24))
            .collect(),
        "array_to_string" | "list_to_string" | "array_join" | "list_join" => {
            let elements = args.lens(0);
            let (delim, null) = (args.lens(1), args.lens(2));
            let leaves = leaf_factor(args.arg(0));
            elements
                .iter()
                .zip(delim)
                .zip(null)
                .map(|((e, d), nl)| {
                    let e = (e / 16).saturating_mul(leaves);
                    e.saturating_mul(d.saturating_add(nl).saturating_add(24))
                })
                .collect()
        }
        _ => return None,
    })
}

/// Leaves per top-level element of a nested list argument (1 for a flat
/// list): `array_to_string` writes a delimiter after every leaf.
fn leaf_factor(arg: Option<&ColumnarValue>) -> u64 {
    let array = match arg {
        Some(ColumnarValue::Array(a)) => Arc::clone(a),
        Some(ColumnarValue::Scalar(s)) => match s.to_array_of_size(1) {
            Ok(a) => a,
            Err(_) => return 1,
        },
        None => return 1,
    };
    fn values(a: &dyn Array) -> Option<ArrayRef> {
        match a.data_type() {
            DataType::List(_) => Some(Arc::clone(a.as_list::<i32>().values())),
            DataType::LargeList(_) => Some(Arc::clone(a.as_list::<i64>().values())),
            DataType::FixedSizeList(..) => Some(Arc::clone(a.as_fixed_size_list().values())),
            _ => None,
        }
    }
    let Some(top) = values(array.as_ref()) else {
        return 1;
    };
    let top_len = top.len().max(1) as u64;
    let mut leaves = top;
    while let Some(inner) = values(leaves.as_ref()) {
        leaves = inner;
    }
    (leaves.len() as u64).div_ceil(top_len).max(1)
}

/// Elements per row of `range` / `generate_series` over numbers, dates or
/// timestamps (an upper bound for temporal steps: a month counts 28 days
/// and a day 23 hours).
fn series_lengths(args: &Args<'_>) -> Vec<u64> {
    let rows = args.rows();
    let temporal = args.arg(0).is_some_and(|a| {
        matches!(
            a.data_type(),
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
        )
    });
    if temporal {
        let micros = |i: usize| -> Vec<Option<i64>> {
            args.cast_per_row::<Int64Type>(
                i,
                &[
                    DataType::Timestamp(TimeUnit::Microsecond, None),
                    DataType::Int64,
                ],
            )
            .unwrap_or_else(|| vec![None; rows])
        };
        let mdn = DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano);
        let steps: Vec<Option<i64>> = match args.cast_per_row::<IntervalMonthDayNanoType>(2, &[mdn])
        {
            Some(steps) => steps
                .into_iter()
                .map(|v| {
                    v.map(|v| {
                        let day = 23 * 3_600_000_000i64;
                        i64::from(v.months)
                            .saturating_mul(28 * 24 * 3_600_000_000)
                            .saturating_add(i64::from(v.days).saturating_mul(day))
                            .saturating_add(v.nanoseconds / 1000)
                    })
                })
                .collect(),
            None => vec![Some(86_400_000_000); rows],
        };
        let (start, stop) = (micros(0), micros(1));
        return (0..rows)
            .map(|r| match (start[r], stop[r], steps[r]) {
                (Some(a), Some(b), Some(step)) => {
                    let span = (i128::from(b) - i128::from(a)).unsigned_abs();
                    let step = u128::from(step.unsigned_abs().max(1));
                    u64::try_from(span / step + 1).unwrap_or(u64::MAX)
                }
                _ => 0,
            })
            .collect();
    }
    let (start, stop, step) = if args.args.len() == 1 {
        (vec![Some(0); rows], args.ints(0), vec![Some(1); rows])
    } else if args.args.len() == 2 {
        (args.ints(0), args.ints(1), vec![Some(1); rows])
    } else {
        (args.ints(0), args.ints(1), args.ints(2))
    };
    (0..rows)
        .map(|r| match (start[r], stop[r], step[r]) {
            (Some(a), Some(b), Some(step)) if step != 0 => {
                let span = i128::from(b) - i128::from(a);
                if span.signum() * i128::from(step.signum()) < 0 {
                    0
                } else {
                    let n = span.unsigned_abs() / u128::from(step.unsigned_abs()) + 1;
                    u64::try_from(n).unwrap_or(u64::MAX)
                }
            }
            _ => 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<arrow::array::RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    fn refused(e: &DataFusionError) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if c.downcast_ref::<TooLarge>().is_some() {
                return true;
            }
            cause = c.source();
        }
        false
    }

    fn ctx() -> SessionContext {
        let ctx = SessionContext::new();
        bound_functions(&ctx);
        ctx
    }

    #[tokio::test]
    async fn amplifiers_are_refused_before_they_allocate() {
        let ctx = ctx();
        for sql in [
            "SELECT array_repeat(1, 2147483647)",
            "SELECT repeat('ab', 1000000000)",
            "SELECT lpad('x', 2147483647)",
            "SELECT range(0, 9000000000000000000)",
            "SELECT generate_series(DATE '1970-01-01', DATE '9999-01-01', INTERVAL '1 day')",
            "SELECT replace(repeat('a', 500000), '', repeat('b', 100))",
            "SELECT array_resize([1], 2147483647, 0)",
            "SELECT levenshtein(repeat('a', 100000), repeat('b', 100000))",
            "SELECT arrow_cast(1, 'FixedSizeList(100000000, Int64)')",
        ] {
            let e = run(&ctx, sql).await.expect_err(sql);
            assert!(refused(&e), "{sql}: {e}");
        }
    }

    #[tokio::test]
    async fn aggregates_that_keep_every_value_are_bounded() {
        let ctx = ctx();
        for sql in [
            // Holds 300 MB.
            "SELECT length(string_agg(repeat('x', 1000) || x, ',')) FROM generate_series(1, 300000) t(x)",
            "SELECT cardinality(array_agg(repeat('x', 1000) || x)) FROM generate_series(1, 300000) t(x)",
            // Hands out 11 bytes more at each of 20,000 rows: 2.2 GB.
            "SELECT max(length(a)) FROM (SELECT string_agg('xxxxxxxxxx', ',') OVER (ORDER BY x) a FROM generate_series(1, 20000) t(x))",
        ] {
            let e = run(&ctx, sql).await.expect_err(sql);
            assert!(refused(&e), "{sql}: {e}");
        }
        for sql in [
            "SELECT string_agg(x::text, ',' ORDER BY x DESC), array_agg(x), median(x) FROM generate_series(1, 5000) t(x)",
            "SELECT x % 3, string_agg(x::text, ','), array_agg(DISTINCT x % 5) FROM generate_series(1, 5000) t(x) GROUP BY 1",
            "SELECT max(length(a)) FROM (SELECT string_agg('x', ',') OVER (PARTITION BY x % 100) a FROM generate_series(1, 20000) t(x))",
        ] {
            run(&ctx, sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    #[tokio::test]
    async fn ordinary_calls_pass() {
        let ctx = ctx();
        for sql in [
            "SELECT array_repeat(1, 3), repeat('ab', 3), lpad('x', 5), range(0, 10)",
            "SELECT replace('hello', 'l', 'LL'), to_char(DATE '2026-01-01', '%Y-%m')",
            "SELECT generate_series(DATE '2026-01-01', DATE '2026-12-01', INTERVAL '1 month')",
            "SELECT levenshtein('kitten', 'sitting'), array_to_string([1, 2], ',')",
        ] {
            run(&ctx, sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}
