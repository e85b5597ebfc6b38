//! Reading Kubernetes quantity strings ("512Mi", "4Gi", "100M") as whole numbers.
//!
//! The CRD schema already rejects malformed quantities at admission; these parsers
//! still return errors so that a controller never panics on data it did not validate.

use std::fmt;

/// A quantity string that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantityError {
    pub input: String,
    pub reason: &'static str,
}

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid quantity {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for QuantityError {}

const MIB: u128 = 1024 * 1024;

/// Parses a quantity into a whole number of base units (bytes, bits, …),
/// rounding up fractions of a unit as Kubernetes does.
pub fn parse(input: &str) -> Result<u64, QuantityError> {
    let err = |reason| QuantityError { input: input.to_string(), reason };
    let s = input.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(err("expected a number such as 512Mi"));
    }
    let (multiplier, divisor): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        _ => return Err(err("unknown suffix; use Ki, Mi, Gi, Ti or k, M, G, T")),
    };
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if frac.len() > 9 || (whole.is_empty() && frac.is_empty()) {
        return Err(err("expected a number such as 512Mi"));
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| err("number too large"))? };
    let frac_digits = frac.len() as u32;
    let frac_value: u128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| err("bad fraction"))? };
    let scale = 10u128.pow(frac_digits);
    let numerator = (whole * scale + frac_value).checked_mul(multiplier).ok_or_else(|| err("number too large"))?;
    let denominator = scale * divisor;
    let value = numerator.div_ceil(denominator);
    u64::try_from(value).map_err(|_| err("number too large"))
}

/// Parses a memory or disk quantity into whole MiB, rounding up.
pub fn parse_mib(input: &str) -> Result<u64, QuantityError> {
    let bytes = u128::from(parse(input)?);
    Ok(u64::try_from(bytes.div_ceil(MIB)).expect("bytes/MiB fits in u64"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse("4Gi").unwrap(), 4 << 30);
        assert_eq!(parse("100M").unwrap(), 100_000_000);
        assert_eq!(parse("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse("1536").unwrap(), 1536);
    }

    #[test]
    fn mib_rounds_up() {
        assert_eq!(parse_mib("1Gi").unwrap(), 1024);
        assert_eq!(parse_mib("1G").unwrap(), 954);
        assert_eq!(parse_mib("1").unwrap(), 1);
    }

    #[test]
    fn malformed_quantities_are_errors() {
        for bad in ["", "Mi", "12Q", "1.2.3Gi", "99999999999999999999999Pi"] {
            assert!(parse(bad).is_err(), "{bad} should not parse");
        }
    }
}
