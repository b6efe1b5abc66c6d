//! Exact decimal quantities: `Decimal128(38, 9)` held as an `i128` count of
//! nano-units.
//!
//! Quantities arrive as JSON numbers or decimal strings. They are parsed from
//! their *text* (never through `f64`, which cannot hold `0.1`) and rounded
//! half-to-even to 9 fractional digits, as the contract requires.

/// Fractional digits kept for every quantity.
pub(crate) const SCALE: u32 = 9;
/// Precision of the Arrow/Parquet column holding quantities.
pub(crate) const PRECISION: u8 = 38;
/// 10^9: one whole unit in nano-units.
pub(crate) const ONE: i128 = 1_000_000_000;
/// Exclusive upper bound of a Decimal128(38, 9) value, in nano-units.
const LIMIT: i128 = 10i128.pow(PRECISION as u32);
/// The largest Decimal128(38, 9) value, in nano-units.
pub(crate) const MAX: i128 = LIMIT - 1;

/// Why a quantity's text was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QuantityError {
    #[error("not a decimal number")]
    Syntax,
    #[error("negative quantities are not allowed")]
    Negative,
    #[error("too large for Decimal128(38, 9)")]
    Overflow,
}

/// Parses a JSON number's text (`12`, `0.1`, `1e3`, `2.5E-4`) into nano-units.
pub(crate) fn parse_json_number(text: &str) -> Result<i128, QuantityError> {
    parse(text, true)
}

/// Parses a decimal string's content (`12.5`; no sign, no exponent).
pub(crate) fn parse_decimal_string(text: &str) -> Result<i128, QuantityError> {
    parse(text, false)
}

fn parse(text: &str, allow_exponent: bool) -> Result<i128, QuantityError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    if let Some(rest) = text.strip_prefix('-') {
        // JSON allows `-0`, which is not a negative quantity; strings take no sign.
        if !allow_exponent {
            return Err(QuantityError::Syntax);
        }
        return match parse(rest, allow_exponent)? {
            0 => Ok(0),
            _ => Err(QuantityError::Negative),
        };
    }
    let int_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &text[int_start..i];
    if int_digits.is_empty() {
        return Err(QuantityError::Syntax);
    }
    let mut frac_digits = "";
    if i < bytes.len() && bytes[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = &text[start..i];
        if frac_digits.is_empty() {
            return Err(QuantityError::Syntax);
        }
    }
    let mut exponent: i64 = 0;
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        if !allow_exponent {
            return Err(QuantityError::Syntax);
        }
        i += 1;
        let mut negative = false;
        if i < bytes.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
            negative = bytes[i] == b'-';
            i += 1;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            // Saturate: anything beyond a few hundred digits either overflows or rounds to zero.
            exponent = (exponent * 10 + i64::from(bytes[i] - b'0')).min(1_000_000);
            i += 1;
        }
        if start == i {
            return Err(QuantityError::Syntax);
        }
        if negative {
            exponent = -exponent;
        }
    }
    if i != bytes.len() {
        return Err(QuantityError::Syntax);
    }
    // value = digits * 10^(exponent - frac_len); scaled = value * 10^SCALE.
    let digits: Vec<u8> = int_digits
        .bytes()
        .chain(frac_digits.bytes())
        .map(|b| b - b'0')
        .skip_while(|d| *d == 0)
        .collect();
    if digits.is_empty() {
        return Ok(0);
    }
    let shift = exponent - frac_digits.len() as i64 + i64::from(SCALE);
    let (kept, dropped): (&[u8], &[u8]) = if shift >= 0 {
        (&digits[..], &[])
    } else {
        let drop = usize::try_from(-shift).unwrap_or(usize::MAX);
        if drop >= digits.len() {
            (&[], &digits[..])
        } else {
            digits.split_at(digits.len() - drop)
        }
    };
    let mut value: i128 = 0;
    for d in kept {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(*d)))
            .ok_or(QuantityError::Overflow)?;
    }
    if shift > 0 {
        for _ in 0..shift {
            value = value.checked_mul(10).ok_or(QuantityError::Overflow)?;
            if value >= LIMIT {
                return Err(QuantityError::Overflow);
            }
        }
    }
    // Round half to even on the dropped digits. When every digit was dropped
    // (drop > len) the first dropped digit is an implicit leading zero.
    let all_dropped_with_padding =
        shift < 0 && usize::try_from(-shift).unwrap_or(usize::MAX) > digits.len();
    if !dropped.is_empty() && !all_dropped_with_padding {
        let first = dropped[0];
        let rest_nonzero = dropped[1..].iter().any(|d| *d != 0);
        let round_up = first > 5 || (first == 5 && (rest_nonzero || value % 2 == 1));
        if round_up {
            value += 1;
        }
    }
    if value >= LIMIT {
        return Err(QuantityError::Overflow);
    }
    Ok(value)
}

/// Renders nano-units as a plain decimal string (`12.5`, `0.000000001`, `3`).
pub(crate) fn to_string(value: i128) -> String {
    let sign = if value < 0 { "-" } else { "" };
    let abs = value.unsigned_abs();
    let int = abs / ONE as u128;
    let frac = abs % ONE as u128;
    if frac == 0 {
        format!("{sign}{int}")
    } else {
        let frac = format!("{frac:09}");
        format!("{sign}{int}.{}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(parse_json_number("0.1"), Ok(100_000_000));
        assert_eq!(parse_json_number("12"), Ok(12 * ONE));
        assert_eq!(parse_decimal_string("12.5"), Ok(12_500_000_000));
        assert_eq!(parse_json_number("1e3"), Ok(1000 * ONE));
        assert_eq!(parse_json_number("2.5E-4"), Ok(250_000));
        assert_eq!(parse_json_number("0"), Ok(0));
        assert_eq!(parse_json_number("-0"), Ok(0));
        assert_eq!(parse_json_number("0.000"), Ok(0));
        assert_eq!(parse_json_number("1e-400"), Ok(0));
    }

    #[test]
    fn rounds_half_to_even_at_nine_digits() {
        assert_eq!(parse_decimal_string("0.0000000005"), Ok(0));
        assert_eq!(parse_decimal_string("0.0000000015"), Ok(2));
        assert_eq!(parse_decimal_string("0.0000000025"), Ok(2));
        assert_eq!(parse_decimal_string("0.00000000250001"), Ok(3));
        assert_eq!(parse_decimal_string("0.0000000024999"), Ok(2));
        assert_eq!(parse_json_number("1.9999999995"), Ok(2 * ONE));
        assert_eq!(parse_json_number("5e-10"), Ok(0));
        assert_eq!(parse_json_number("6e-10"), Ok(1));
        assert_eq!(parse_json_number("5e-11"), Ok(0));
    }

    #[test]
    fn refuses_bad_text() {
        assert_eq!(parse_json_number("-1"), Err(QuantityError::Negative));
        assert_eq!(parse_decimal_string("1e3"), Err(QuantityError::Syntax));
        assert_eq!(parse_decimal_string("abc"), Err(QuantityError::Syntax));
        assert_eq!(parse_decimal_string(""), Err(QuantityError::Syntax));
        assert_eq!(parse_decimal_string("1."), Err(QuantityError::Syntax));
        assert_eq!(parse_decimal_string(".5"), Err(QuantityError::Syntax));
        assert_eq!(parse_json_number("1e29"), Err(QuantityError::Overflow));
        assert_eq!(parse_json_number("1e400"), Err(QuantityError::Overflow));
        assert!(parse_decimal_string("99999999999999999999999999999.999999999").is_ok());
        assert_eq!(
            parse_decimal_string("99999999999999999999999999999.9999999996"),
            Err(QuantityError::Overflow)
        );
    }

    #[test]
    fn renders() {
        assert_eq!(to_string(12_500_000_000), "12.5");
        assert_eq!(to_string(1), "0.000000001");
        assert_eq!(to_string(3 * ONE), "3");
    }
}
