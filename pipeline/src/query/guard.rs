//! What a statement must be before it is planned and run: a read (no DDL,
//! DML, COPY or statement), no deeper than [`MAX_EXPR_DEPTH`], no larger
//! than [`MAX_RELATIONS`] and [`MAX_SELECTS`], with no type or aggregate
//! argument that would allocate without bound.
//!
//! The size limits exist because planning is not linear: DataFusion plans
//! a `UNION ALL` of 3,200 branches, or a join of 120 tables, in tens of
//! seconds, and its optimizer holds the whole plan several times over.
//! Counting the syntax tree takes microseconds.

use std::ops::ControlFlow;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion, TreeNodeVisitor};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::scalar::ScalarValue;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Select, TableFactor, Visit, Visitor};

use super::QueryError;
use super::bounded;

/// The deepest expression nesting a query may have (SQLite's default
/// `SQLITE_MAX_EXPR_DEPTH`). Parts of DataFusion's planner recurse once per
/// level without stack protection and take time quadratic in the depth, so
/// `1+1+...+1` with 5,000 terms would take minutes to plan, or overflow
/// the stack and abort the process. Refusing it takes a millisecond.
pub const MAX_EXPR_DEPTH: usize = 1000;

/// Tables, views and subqueries one statement may name in its `FROM`
/// clauses (a join of 64 plans in about a second).
pub const MAX_RELATIONS: usize = 64;

/// `SELECT` blocks one statement may hold: branches of `UNION`,
/// `INTERSECT` and `EXCEPT`, and subqueries (256 plan in under a second).
pub const MAX_SELECTS: usize = 256;

/// The longest delimiter `string_agg` may put between values.
pub const MAX_DELIMITER_BYTES: usize = 1024;

/// The largest `max_size` (centroids) of `approx_percentile_cont`.
pub const MAX_PERCENTILE_CENTROIDS: i64 = 10_000;

/// Finds the first plan node that would change something.
struct ReadOnlyGuard {
    refused: Option<String>,
}

impl<'n> TreeNodeVisitor<'n> for ReadOnlyGuard {
    type Node = LogicalPlan;

    fn f_down(&mut self, node: &'n LogicalPlan) -> datafusion::error::Result<TreeNodeRecursion> {
        self.refused = match node {
            LogicalPlan::Ddl(ddl) => Some(format!("DDL ({})", ddl.name())),
            LogicalPlan::Dml(dml) => Some(format!("DML ({})", dml.op)),
            LogicalPlan::Copy(_) => Some("COPY".to_owned()),
            LogicalPlan::Statement(s) => Some(format!("the statement {}", s.name())),
            _ => None,
        };
        Ok(if self.refused.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    }
}

/// Why a statement is refused before planning.
enum Refusal {
    TooDeep,
    TooLarge(String),
}

/// Counts how deep expressions nest, and the relations and `SELECT`s of
/// the statement; stops at the first limit passed. sqlparser's walk is
/// itself stack-protected (`recursive`).
#[derive(Default)]
struct SizeGuard {
    depth: usize,
    relations: usize,
    selects: usize,
}

impl Visitor for SizeGuard {
    type Break = Refusal;

    fn pre_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<Refusal> {
        self.depth += 1;
        if self.depth > MAX_EXPR_DEPTH {
            ControlFlow::Break(Refusal::TooDeep)
        } else {
            ControlFlow::Continue(())
        }
    }

    fn post_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<Refusal> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, _: &TableFactor) -> ControlFlow<Refusal> {
        self.relations += 1;
        if self.relations > MAX_RELATIONS {
            return ControlFlow::Break(Refusal::TooLarge(format!(
                "it reads more than {MAX_RELATIONS} tables, views or subqueries"
            )));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, _: &Select) -> ControlFlow<Refusal> {
        self.selects += 1;
        if self.selects > MAX_SELECTS {
            return ControlFlow::Break(Refusal::TooLarge(format!(
                "it holds more than {MAX_SELECTS} SELECTs (UNION branches and subqueries)"
            )));
        }
        ControlFlow::Continue(())
    }
}

/// Refuses what the plan-level guard cannot see in time: DataFusion's own
/// statements that write or set (they would be planned first), and
/// statements deeper or larger than the limits of this module.
pub fn check_statement(stmt: &DFStatement) -> Result<(), QueryError> {
    let refused = |what: &str| {
        Err(QueryError::ReadOnly {
            refused: what.to_owned(),
        })
    };
    match stmt {
        DFStatement::Statement(s) => {
            use datafusion::sql::sqlparser::ast::Statement as S;
            // Only reads get as far as the planner: a write can fail to
            // plan for reasons of its own, and must be refused as a write.
            let reads = matches!(
                **s,
                S::Query(_)
                    | S::Explain { .. }
                    | S::ExplainTable { .. }
                    | S::ShowTables { .. }
                    | S::ShowColumns { .. }
                    | S::ShowVariable { .. }
                    | S::ShowFunctions { .. }
                    | S::ShowViews { .. }
                    | S::ShowSchemas { .. }
                    | S::ShowDatabases { .. }
                    | S::ShowCatalogs { .. }
                    | S::ShowCreate { .. }
            );
            if !reads {
                let text = s.to_string();
                let verb: Vec<&str> = text.split_whitespace().take(2).collect();
                return refused(&verb.join(" "));
            }
            match s.visit(&mut SizeGuard::default()) {
                ControlFlow::Break(Refusal::TooDeep) => Err(QueryError::ExpressionTooDeep),
                ControlFlow::Break(Refusal::TooLarge(why)) => Err(QueryError::PlanTooLarge { why }),
                ControlFlow::Continue(()) => Ok(()),
            }
        }
        DFStatement::Explain(e) => check_statement(&e.statement),
        DFStatement::CreateExternalTable(_) => refused("DDL (CREATE EXTERNAL TABLE)"),
        DFStatement::CopyTo(_) => refused("COPY"),
        DFStatement::Reset(_) => refused("the statement RESET"),
    }
}

/// Refuses a plan that writes, defines or sets anything, or casts to a
/// type of unbounded fixed size (`CAST(x AS INT[2147483647])`), before it
/// is optimized (the optimizer would evaluate the cast of a constant).
pub fn check_plan(plan: &LogicalPlan) -> Result<(), QueryError> {
    let mut guard = ReadOnlyGuard { refused: None };
    plan.visit_with_subqueries(&mut guard)
        .map_err(QueryError::Execute)?;
    if let Some(refused) = guard.refused {
        return Err(QueryError::ReadOnly { refused });
    }
    each_expr(plan, &mut |e| match e {
        Expr::Cast(c) => bounded::check_type("CAST", c.field.data_type()),
        Expr::TryCast(c) => bounded::check_type("TRY_CAST", c.field.data_type()),
        _ => Ok(()),
    })
}

/// Refuses aggregate arguments that would let one accumulator grow
/// without bound in one batch, once the optimizer has folded them to
/// literals: a `string_agg` delimiter over [`MAX_DELIMITER_BYTES`], an
/// `approx_percentile_cont` size over [`MAX_PERCENTILE_CENTROIDS`].
pub fn check_optimized(plan: &LogicalPlan) -> Result<(), QueryError> {
    each_expr(plan, &mut |e| {
        let Expr::AggregateFunction(agg) = e else {
            return Ok(());
        };
        let name = agg.func.name();
        let args = &agg.params.args;
        let too_large = |what: String| {
            datafusion::error::DataFusionError::External(Box::new(bounded::TooLarge {
                function: name.to_owned(),
                what,
            }))
        };
        match name {
            "string_agg" => {
                let long = match args.get(1) {
                    Some(Expr::Literal(v, _)) => literal_len(v) > MAX_DELIMITER_BYTES,
                    _ => false,
                };
                if long {
                    return Err(too_large(format!(
                        "the delimiter is longer than the {MAX_DELIMITER_BYTES} bytes allowed"
                    )));
                }
            }
            "approx_percentile_cont" | "approx_percentile_cont_with_weight" => {
                for a in args.iter().skip(2) {
                    if let Expr::Literal(v, _) = a {
                        let size = v.cast_to(&arrow::datatypes::DataType::Int64).ok().and_then(
                            |v| match v {
                                ScalarValue::Int64(n) => n,
                                _ => None,
                            },
                        );
                        if size.is_some_and(|n| n > MAX_PERCENTILE_CENTROIDS) {
                            return Err(too_large(format!(
                                "max_size is over the {MAX_PERCENTILE_CENTROIDS} allowed"
                            )));
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    })
}

fn literal_len(v: &ScalarValue) -> usize {
    match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => s.len(),
        other => other.size(),
    }
}

/// Calls `f` on every expression of `plan`, its subqueries included.
fn each_expr(
    plan: &LogicalPlan,
    f: &mut dyn FnMut(&Expr) -> datafusion::error::Result<()>,
) -> Result<(), QueryError> {
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                f(e)?;
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })
    .map(|_| ())
    .map_err(|e| super::classify(e, 0))
}

/// The deepest nesting of parentheses and brackets a statement's text may
/// have. The Postgres-dialect parser of `tally serve` takes time
/// exponential in the nesting of function calls (18 levels of
/// `make_array(` take over a second, 40 would take days, on a thread that
/// cannot be stopped), so the nesting is counted on the text first.
pub const MAX_NESTING: usize = 16;

/// Refuses a statement text nested deeper than [`MAX_NESTING`]. Strings,
/// quoted identifiers and comments do not count.
pub fn check_text(sql: &str) -> Result<(), QueryError> {
    let b = sql.as_bytes();
    let (mut i, mut depth) = (0usize, 0usize);
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        // A doubled quote is one quote inside the string.
                        if b.get(i + 1) == Some(&q) {
                            i += 1;
                        } else {
                            break;
                        }
                    }
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'(' | b'[' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(QueryError::PlanTooLarge {
                        why: format!(
                            "its parentheses and brackets nest more than {MAX_NESTING} deep"
                        ),
                    });
                }
            }
            b')' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_counted_outside_strings_and_comments() {
        let deep = |d: usize| format!("SELECT {}1{}", "make_array(".repeat(d), ")".repeat(d));
        assert!(check_text(&deep(MAX_NESTING)).is_ok());
        assert!(matches!(
            check_text(&deep(MAX_NESTING + 1)),
            Err(QueryError::PlanTooLarge { .. })
        ));
        let quoted = format!(
            "SELECT '{}' AS \"{}\" -- {}\n/* {} */",
            "(".repeat(50),
            "[".repeat(50),
            "(".repeat(50),
            "(".repeat(50)
        );
        assert!(check_text(&quoted).is_ok());
        assert!(check_text("SELECT 'it''s ((((((((((((((((((('").is_ok());
    }

    #[test]
    fn the_postgres_parser_is_quick_at_the_limit() {
        let sql = format!(
            "SELECT {}1{}",
            "make_array(".repeat(MAX_NESTING),
            ")".repeat(MAX_NESTING)
        );
        let parser =
            datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser::new();
        let started = std::time::Instant::now();
        let _ = parser.parse(&sql);
        // Debug build; a release build is several times faster.
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
    }
}
