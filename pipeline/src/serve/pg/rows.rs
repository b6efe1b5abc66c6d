//! Rows as the wire carries them: data rows (decimals with every digit,
//! the rest encoded by arrow-pg) and the lines of `COPY ... TO STDOUT`.

use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions as ArrowFormat};
use datafusion_postgres::arrow_pg::encoder::encode_value;
use pgwire::api::results::{DataRowEncoder, FieldInfo};
use pgwire::error::PgWireResult;
use pgwire::messages::data::DataRow;

use crate::serve::numeric::Numeric;
use crate::serve::views::Answer;

/// Encodes the rows, decimals with every digit, the rest with arrow-pg.
pub fn encode_rows(
    fields: &Arc<Vec<FieldInfo>>,
    batches: &[RecordBatch],
) -> PgWireResult<Vec<DataRow>> {
    let mut rows = Vec::new();
    for batch in batches {
        let schema = batch.schema();
        let mut enc = DataRowEncoder::new(Arc::clone(fields));
        for row in 0..batch.num_rows() {
            for (i, column) in batch.columns().iter().enumerate() {
                let pg = &fields[i];
                if let DataType::Decimal128(_, scale) = column.data_type() {
                    let value =
                        crate::serve::numeric::decimal_at(column.as_ref(), row).map(|v| Numeric {
                            value: v,
                            scale: *scale,
                        });
                    enc.encode_field_with_type_and_format(
                        &value,
                        pg.datatype(),
                        pg.format(),
                        pg.format_options(),
                    )?;
                } else {
                    encode_value(&mut enc, column, row, schema.field(i), pg)?;
                }
            }
            rows.push(enc.take_row());
        }
    }
    Ok(rows)
}

/// The lines of `COPY ... TO STDOUT` in Postgres's text or CSV format.
pub(super) fn copy_lines(
    answer: &Answer,
    csv: bool,
    header: bool,
    delimiter: char,
) -> Result<Vec<String>, String> {
    let options = ArrowFormat::default()
        .with_null("\u{0}")
        .with_timestamp_tz_format(Some("%Y-%m-%d %H:%M:%S%.f%:::z"))
        .with_timestamp_format(Some("%Y-%m-%d %H:%M:%S%.f"));
    let mut lines = Vec::new();
    let quote = |s: &str| -> String {
        if csv {
            if s.contains(delimiter)
                || s.contains('"')
                || s.contains('\n')
                || s.contains('\r')
                || s.is_empty()
            {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_owned()
            }
        } else {
            s.replace('\\', "\\\\")
                .replace('\t', "\\t")
                .replace('\n', "\\n")
                .replace('\r', "\\r")
        }
    };
    // The header rides in the first message, so that pgwire's count of
    // messages (the `COPY n` tag) counts rows.
    let mut header_line = if header {
        let names: Vec<String> = answer
            .schema
            .fields()
            .iter()
            .map(|f| quote(f.name()))
            .collect();
        format!("{}\n", names.join(&delimiter.to_string()))
    } else {
        String::new()
    };
    for batch in &answer.batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        for row in 0..batch.num_rows() {
            let mut cells = Vec::with_capacity(formatters.len());
            for (f, c) in formatters.iter().zip(batch.columns()) {
                if c.is_null(row) {
                    cells.push(if csv { String::new() } else { "\\N".to_owned() });
                } else {
                    let text = f.value(row).to_string();
                    cells.push(if csv && text.is_empty() {
                        "\"\"".into()
                    } else {
                        quote(&text)
                    });
                }
            }
            let line = format!("{}\n", cells.join(&delimiter.to_string()));
            if header_line.is_empty() {
                lines.push(line);
            } else {
                lines.push(std::mem::take(&mut header_line) + &line);
            }
        }
    }
    if !header_line.is_empty() {
        lines.push(header_line);
    }
    Ok(lines)
}
