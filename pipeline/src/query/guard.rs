//! What a statement must be before it is planned and run: a read (no DDL,
//! DML, COPY or statement), no deeper than [`MAX_EXPR_DEPTH`], no larger
//! than [`MAX_RELATIONS`] and [`MAX_SELECTS`], with no type or aggregate
//! argument that would allocate without bound.
//!
//! The size limits exist because planning is not linear: DataFusion plans
//! a `UNION ALL` of 3,200 branches, or a join of 120 tables, in tens of
//! seconds, and its optimizer holds the whole plan several times over.
//! Counting the syntax tree takes microseconds. DataFusion also plans each
//! reference to a common table expression as a copy of its body, so a
//! chain of CTEs each naming the one before twice is a plan of 2^n
//! relations from a short text: the statement is also measured as planned,
//! each CTE reference counted as its body ([`MAX_EXPANDED`]).

use std::ops::ControlFlow;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion, TreeNodeVisitor};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::scalar::ScalarValue;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, Query, Select, TableFactor, Visit, Visitor,
};

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

/// Tables, views, subqueries and `SELECT`s one statement may hold once
/// every reference to a CTE is counted as the CTE's body, as DataFusion
/// plans it. Within [`MAX_RELATIONS`] and [`MAX_SELECTS`] a statement
/// without CTEs is under it; `WITH c1 AS (...), c2 AS (SELECT ... FROM c1
/// a, c1 b), ...` doubles with each CTE, and 30 of them took 11 GB while
/// planning.
pub const MAX_EXPANDED: u64 = 512;

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

/// The CTEs a statement defines (by lower-cased name; a name defined in
/// several scopes keeps every body, and the largest counts).
#[derive(Default)]
struct CteBodies(std::collections::HashMap<String, Vec<Query>>);

impl Visitor for CteBodies {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.0
                    .entry(cte.alias.name.value.to_lowercase())
                    .or_default()
                    .push((*cte.query).clone());
            }
        }
        ControlFlow::Continue(())
    }
}

/// Counts relations and `SELECT`s, a reference to a CTE as its weight.
struct Sizer<'w> {
    weights: &'w std::collections::HashMap<String, u64>,
    /// The CTE being measured: a recursive CTE's reference to itself is
    /// one relation (DataFusion plans it as a work table).
    within: Option<&'w str>,
    total: u64,
}

impl Visitor for Sizer<'_> {
    type Break = ();

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        let weight = match t {
            TableFactor::Table { name, .. } => match name.0.as_slice() {
                [part] => part
                    .as_ident()
                    .map(|i| i.value.to_lowercase())
                    .filter(|n| Some(n.as_str()) != self.within)
                    .and_then(|n| self.weights.get(&n).copied())
                    .unwrap_or(1),
                _ => 1,
            },
            _ => 1,
        };
        self.total = self.total.saturating_add(weight);
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, _: &Select) -> ControlFlow<()> {
        self.total = self.total.saturating_add(1);
        ControlFlow::Continue(())
    }
}

/// The relations and `SELECT`s of `s` as DataFusion plans it: each
/// reference to a CTE counted as the CTE's body, itself measured the same
/// way (computed to a fixed point: a chain of n CTEs settles in n rounds;
/// the measure only grows, so it stops once past [`MAX_EXPANDED`]).
fn expanded_size(s: &datafusion::sql::sqlparser::ast::Statement) -> u64 {
    let mut bodies = CteBodies::default();
    let _ = s.visit(&mut bodies);
    let mut weights: std::collections::HashMap<String, u64> =
        bodies.0.keys().map(|n| (n.clone(), 1)).collect();
    let measure = |weights: &std::collections::HashMap<String, u64>,
                   within: Option<&str>,
                   node: &dyn Fn(&mut Sizer<'_>)| {
        let mut sizer = Sizer {
            weights,
            within,
            total: 0,
        };
        node(&mut sizer);
        sizer.total
    };
    for _ in 0..=bodies.0.len() {
        let mut changed = false;
        let mut next = weights.clone();
        for (name, defs) in &bodies.0 {
            let w = defs
                .iter()
                .map(|q| {
                    measure(&weights, Some(name.as_str()), &|sizer| {
                        let _ = q.visit(sizer);
                    })
                })
                .max()
                .unwrap_or(1)
                .max(1);
            if next.get(name) != Some(&w) {
                next.insert(name.clone(), w);
                changed = true;
            }
        }
        weights = next;
        if !changed || weights.values().any(|w| *w > MAX_EXPANDED) {
            break;
        }
    }
    measure(&weights, None, &|sizer| {
        let _ = s.visit(sizer);
    })
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
                ControlFlow::Continue(()) => {
                    if expanded_size(s) > MAX_EXPANDED {
                        return Err(QueryError::PlanTooLarge {
                            why: format!(
                                "counting each reference to a WITH query as its body, as it is planned, it reads more than {MAX_EXPANDED} tables, views, subqueries and SELECTs"
                            ),
                        });
                    }
                    Ok(())
                }
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

    fn checked(sql: &str) -> Result<(), QueryError> {
        let mut statements = datafusion::sql::parser::DFParser::parse_sql(sql).unwrap();
        check_statement(&statements.pop_front().unwrap())
    }

    /// `WITH c0 AS (SELECT 1 x), c1 AS (SELECT ... FROM c0 a, c0 b), ...`:
    /// each CTE twice the one before once planned.
    fn doubling(n: usize, join: bool) -> String {
        let mut ctes = vec!["c0 AS (SELECT 1 x)".to_owned()];
        for i in 1..n {
            let p = i - 1;
            ctes.push(if join {
                format!("c{i} AS (SELECT a.x + b.x x FROM c{p} a, c{p} b)")
            } else {
                format!("c{i} AS (SELECT x FROM c{p} UNION ALL SELECT x FROM c{p})")
            });
        }
        format!("WITH {} SELECT * FROM c{}", ctes.join(", "), n - 1)
    }

    #[test]
    fn a_cte_counts_as_its_body_at_every_reference() {
        for join in [true, false] {
            assert!(checked(&doubling(5, join)).is_ok());
            for n in [9, 29, 200] {
                assert!(
                    matches!(
                        checked(&doubling(n, join)),
                        Err(QueryError::PlanTooLarge { .. })
                    ),
                    "{n} {join}"
                );
            }
        }
        // A recursive CTE's reference to itself is one relation.
        assert!(
            checked(
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) \
                 SELECT * FROM r a, r b"
            )
            .is_ok()
        );
    }

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
