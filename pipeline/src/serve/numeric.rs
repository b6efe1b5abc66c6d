//! Postgres `numeric` with every digit of a `Decimal128(38, s)`.
//!
//! arrow-pg converts decimals through `rust_decimal`, which holds 28
//! digits; a 38-digit value would fail. [`Numeric`] writes the text form
//! and the binary form (base-10000 digits, weight, sign, display scale)
//! straight from the `i128`.

use std::error::Error;

use arrow::array::{Array, Decimal128Array};
use bytes::{BufMut, BytesMut};
use pgwire::types::ToSqlText;
use pgwire::types::format::FormatOptions;
use postgres_types::{IsNull, ToSql, Type, to_sql_checked};

/// An unscaled `value` with `scale` fractional digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numeric {
    pub value: i128,
    pub scale: i8,
}

/// The decimal at `row` of a `Decimal128` column (`None` if null).
pub fn decimal_at(column: &dyn Array, row: usize) -> Option<i128> {
    let a = column.as_any().downcast_ref::<Decimal128Array>()?;
    (!a.is_null(row)).then(|| a.value(row))
}

impl Numeric {
    /// Integer digits and fractional digits (exactly `scale` of them).
    fn digits(&self) -> (String, String) {
        let abs = self.value.unsigned_abs();
        let scale = self.scale.max(0) as u32;
        let pow = 10u128.pow(scale);
        let int = (abs / pow).to_string();
        let frac = if scale == 0 {
            String::new()
        } else {
            format!("{:0width$}", abs % pow, width = scale as usize)
        };
        (int, frac)
    }

    pub fn text(&self) -> String {
        let (int, frac) = self.digits();
        let sign = if self.value < 0 { "-" } else { "" };
        if frac.is_empty() {
            format!("{sign}{int}")
        } else {
            format!("{sign}{int}.{frac}")
        }
    }

    /// The binary `numeric` wire form.
    pub fn binary(&self, out: &mut BytesMut) {
        let (int, frac) = self.digits();
        let int = int.trim_start_matches('0');
        // Integer digits in groups of four from the decimal point leftward,
        // fractional ones rightward.
        let int_pad = (4 - int.len() % 4) % 4;
        let int_digits = format!("{}{int}", "0".repeat(int_pad));
        let frac_pad = (4 - frac.len() % 4) % 4;
        let frac_digits = format!("{frac}{}", "0".repeat(frac_pad));
        let group = |s: &str| -> Vec<i16> {
            s.as_bytes()
                .chunks(4)
                .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + i16::from(d - b'0')))
                .collect()
        };
        let mut groups = group(&int_digits);
        let mut weight = groups.len() as i16 - 1;
        groups.extend(group(&frac_digits));
        // Leading zero groups move the weight; trailing ones are dropped.
        let lead = groups.iter().take_while(|&&g| g == 0).count();
        groups.drain(..lead);
        weight -= lead as i16;
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
        out.put_i16(groups.len() as i16);
        out.put_i16(weight);
        out.put_u16(if self.value < 0 && !groups.is_empty() {
            0x4000
        } else {
            0
        });
        out.put_u16(self.scale.max(0) as u16);
        for g in groups {
            out.put_i16(g);
        }
    }
}

impl ToSql for Numeric {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        self.binary(out);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

impl ToSqlText for Numeric {
    fn to_sql_text(
        &self,
        _: &Type,
        out: &mut BytesMut,
        _: &FormatOptions,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_slice(self.text().as_bytes());
        Ok(IsNull::No)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(value: i128, scale: i8) -> Vec<i16> {
        let mut out = BytesMut::new();
        Numeric { value, scale }.binary(&mut out);
        out.chunks(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn text_keeps_every_digit() {
        let max = 10i128.pow(38) - 1;
        assert_eq!(
            Numeric {
                value: max,
                scale: 9
            }
            .text(),
            "99999999999999999999999999999.999999999"
        );
        assert_eq!(
            Numeric {
                value: -1_500_000_000,
                scale: 9
            }
            .text(),
            "-1.500000000"
        );
        assert_eq!(Numeric { value: 5, scale: 9 }.text(), "0.000000005");
        assert_eq!(
            Numeric {
                value: 42,
                scale: 0
            }
            .text(),
            "42"
        );
    }

    #[test]
    fn binary_matches_postgres() {
        // ndigits, weight, sign, dscale, digits... as Postgres sends
        // `SELECT 12345.678::numeric(38,9)` and friends.
        assert_eq!(bin(12_345_678_000_000, 9), vec![3, 1, 0, 9, 1, 2345, 6780]);
        assert_eq!(bin(1_500_000_000, 9), vec![2, 0, 0, 9, 1, 5000]);
        assert_eq!(bin(-1_500_000_000, 9), vec![2, 0, 0x4000, 9, 1, 5000]);
        assert_eq!(bin(0, 9), vec![0, 0, 0, 9]);
        assert_eq!(bin(5, 9), vec![1, -3, 0, 9, 5000]);
        assert_eq!(bin(10_000_000_000_000, 9), vec![1, 1, 0, 9, 1]);
        let max = 10i128.pow(38) - 1;
        assert_eq!(
            bin(max, 9),
            vec![
                11, 7, 0, 9, 9, 9999, 9999, 9999, 9999, 9999, 9999, 9999, 9999, 9999, 9000
            ]
        );
    }
}
