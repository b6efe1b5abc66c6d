//! Result formats of `tally sql`: table, csv, json, jsonl, parquet.
//!
//! JSON rows carry every column, a NULL as an explicit `null`: a consumer
//! reading the rows must not have to know the schema to tell "NULL" from
//! "no such column".

use std::io::Write;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;

use super::QueryError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned text table for people.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON array of row objects.
    Json,
    /// One JSON object per row (JSON Lines).
    Jsonl,
    /// A Parquet file (write it to a file: `> out.parquet`).
    Parquet,
}

fn out(e: impl std::fmt::Display) -> QueryError {
    QueryError::Output(e.to_string())
}

/// Writes `batches` to `w` in `format`.
pub fn write_batches<W: Write>(
    batches: &[RecordBatch],
    format: OutputFormat,
    mut w: W,
) -> Result<(), QueryError> {
    match format {
        OutputFormat::Table => {
            let table = arrow::util::pretty::pretty_format_batches(batches).map_err(out)?;
            writeln!(w, "{table}").map_err(out)?;
        }
        OutputFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut w);
            for b in batches {
                writer.write(b).map_err(out)?;
            }
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::JsonArray>(&mut w);
            for b in batches {
                writer.write(b).map_err(out)?;
            }
            writer.finish().map_err(out)?;
            writeln!(w).map_err(out)?;
        }
        OutputFormat::Jsonl => {
            let mut writer = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::LineDelimited>(&mut w);
            for b in batches {
                writer.write(b).map_err(out)?;
            }
            writer.finish().map_err(out)?;
        }
        OutputFormat::Parquet => {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| Arc::new(Schema::empty()));
            let mut buf = Vec::new();
            let mut writer =
                parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None).map_err(out)?;
            for b in batches {
                writer.write(b).map_err(out)?;
            }
            writer.close().map_err(out)?;
            w.write_all(&buf).map_err(out)?;
        }
    }
    w.flush().map_err(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(1), None])),
                Arc::new(StringArray::from(vec![None, Some("x")])),
            ],
        )
        .unwrap()
    }

    fn render(format: OutputFormat) -> String {
        let mut out = Vec::new();
        write_batches(&[batch()], format, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_rows_carry_null_columns() {
        assert_eq!(
            render(OutputFormat::Jsonl),
            "{\"a\":1,\"b\":null}\n{\"a\":null,\"b\":\"x\"}\n"
        );
        assert_eq!(
            render(OutputFormat::Json),
            "[{\"a\":1,\"b\":null},{\"a\":null,\"b\":\"x\"}]\n"
        );
    }
}
