//! Kubernetes-style resource quantities, the notation OpenShell's compute-driver contract
//! uses for CPU and memory (`"500m"`, `"2"`, `"512Mi"`, `"4Gi"`), turned into what a
//! microVM is sized by: whole vCPUs and MiB.
//!
//! A VM cannot have half a CPU or a partial MiB, so both round up: `500m` is one vCPU,
//! `1.5` is two, `1000k` bytes is one MiB. The arithmetic is exact (integers, no floats),
//! and every input is bounded: at most [`MAX_QUANTITY_LEN`] bytes, and a result that does
//! not fit in a `u32` is an error rather than a wrapped number.

/// Longest quantity string accepted; far beyond any real one.
pub const MAX_QUANTITY_LEN: usize = 64;

/// Digits after the decimal point a quantity may carry (Kubernetes keeps nanounits).
const MAX_FRACTION_DIGITS: usize = 9;

const ACCEPTED_CPU: &str = "a whole or decimal number of CPUs (\"2\", \"1.5\") or millicpus \
     (\"500m\"), greater than zero";
const ACCEPTED_MEMORY: &str = "a whole or decimal number of bytes, optionally with a binary \
     (Ki, Mi, Gi, Ti, Pi, Ei) or decimal (k, M, G, T, P, E) suffix (\"512Mi\", \"4Gi\", \
     \"1G\"), greater than zero";

/// A quantity that could not be read; the message quotes it and says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {input:?}: {reason}; accepted: {accepted}")]
pub struct QuantityError {
    /// Which field the quantity came from, e.g. `resources.cpu_limit`.
    pub what: String,
    /// The input, cut to [`MAX_QUANTITY_LEN`] bytes.
    pub input: String,
    pub reason: String,
    pub accepted: &'static str,
}

/// Whole vCPUs for a CPU quantity, rounded up. `what` names the field in errors.
pub fn vcpus(what: &str, input: &str) -> Result<u32, QuantityError> {
    let error = |reason: String| QuantityError {
        what: what.to_owned(),
        input: shown(input),
        reason,
        accepted: ACCEPTED_CPU,
    };
    let (number, per_cpu) = match input.strip_suffix('m') {
        Some(number) => (number, 1),
        None => (input, 1000),
    };
    let millicpus = scaled(input, number, per_cpu).map_err(error)?;
    to_u32(millicpus.div_ceil(1000)).map_err(error)
}

/// Whole MiB for a memory quantity, rounded up. `what` names the field in errors.
pub fn memory_mib(what: &str, input: &str) -> Result<u32, QuantityError> {
    let error = |reason: String| QuantityError {
        what: what.to_owned(),
        input: shown(input),
        reason,
        accepted: ACCEPTED_MEMORY,
    };
    let split = input
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(input.len());
    let (number, suffix) = input.split_at(split);
    let bytes_per_unit: u128 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u128.pow(2),
        "G" => 1000u128.pow(3),
        "T" => 1000u128.pow(4),
        "P" => 1000u128.pow(5),
        "E" => 1000u128.pow(6),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        other => return Err(error(format!("the suffix {other:?} is not a memory unit"))),
    };
    let bytes = scaled(input, number, bytes_per_unit).map_err(error)?;
    to_u32(bytes.div_ceil(1 << 20)).map_err(error)
}

/// `number` (decimal digits with at most one point) times `unit`, rounded up to a whole
/// count; `input` is the whole quantity, checked for length.
fn scaled(input: &str, number: &str, unit: u128) -> Result<u128, String> {
    if input.len() > MAX_QUANTITY_LEN {
        return Err(format!("it is longer than {MAX_QUANTITY_LEN} bytes"));
    }
    if number.is_empty() {
        return Err("it has no number".to_owned());
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) || (whole.is_empty() && fraction.is_empty()) {
        return Err("it is not a plain decimal number".to_owned());
    }
    if fraction.len() > MAX_FRACTION_DIGITS {
        return Err(format!(
            "it has more than {MAX_FRACTION_DIGITS} digits after the point"
        ));
    }
    let too_large = || "it is too large".to_owned();
    // Whole and fraction as one integer over 10^fraction_digits, so nothing is lost.
    let denominator = 10u128.pow(fraction.len() as u32);
    let numerator = format!("{whole}{fraction}")
        .trim_start_matches('0')
        .parse::<u128>()
        .or_else(|_| {
            // Empty after trimming leading zeros: the number is zero.
            if whole.bytes().chain(fraction.bytes()).all(|b| b == b'0') {
                Ok(0)
            } else {
                Err(too_large())
            }
        })?;
    if numerator == 0 {
        return Err("it is zero".to_owned());
    }
    let total = numerator.checked_mul(unit).ok_or_else(too_large)?;
    Ok(total.div_ceil(denominator))
}

fn to_u32(value: u128) -> Result<u32, String> {
    u32::try_from(value).map_err(|_| "it is too large".to_owned())
}

/// The input for an error message, cut so a hostile one cannot flood the log.
fn shown(input: &str) -> String {
    let mut end = input.len().min(MAX_QUANTITY_LEN);
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    input[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_round_up_to_whole_vcpus() {
        for (input, expected) in [
            ("2", 2),
            ("500m", 1),
            ("1000m", 1),
            ("1001m", 2),
            ("1.5", 2),
            ("0.1", 1),
            ("4.0", 4),
            ("64", 64),
            (".5", 1),
            ("007", 7),
        ] {
            assert_eq!(vcpus("cpu_limit", input), Ok(expected), "{input}");
        }
    }

    #[test]
    fn memory_quantities_round_up_to_whole_mib() {
        for (input, expected) in [
            ("512Mi", 512),
            ("4Gi", 4096),
            ("1Gi", 1024),
            ("1.5Gi", 1536),
            ("1048576", 1),
            ("1048577", 2),
            ("1G", 954),
            ("1000M", 954),
            ("2048Ki", 2),
            ("1Ti", 1 << 20),
            ("0.5Mi", 1),
        ] {
            assert_eq!(memory_mib("memory_limit", input), Ok(expected), "{input}");
        }
    }

    #[test]
    fn bad_quantities_are_errors_naming_the_field_and_the_input() {
        type Parser = fn(&str, &str) -> Result<u32, QuantityError>;
        let cases: [(Parser, &str, &[&str], &str); 2] = [
            (
                vcpus,
                "resources.cpu_limit",
                &[
                    "",
                    "0",
                    "0m",
                    "0.0",
                    "-1",
                    "+1",
                    "1e3",
                    ".",
                    "1..2",
                    "one",
                    " 2",
                    "2 ",
                    "2Gi",
                    "1.0000000001",
                    "5000000000",
                ],
                ACCEPTED_CPU,
            ),
            (
                memory_mib,
                "resources.memory_limit",
                &[
                    "",
                    "0",
                    "0Gi",
                    "512mi",
                    "512m",
                    "4GB",
                    "-1Gi",
                    "1e9",
                    "Gi",
                    "99999999Ei",
                    "5000000Ti",
                ],
                ACCEPTED_MEMORY,
            ),
        ];
        for (parse, field, inputs, accepted) in cases {
            for input in inputs {
                let err = parse(field, input).expect_err(input).to_string();
                assert!(err.starts_with(&format!("{field} {input:?}: ")), "{err}");
                assert!(err.ends_with(&format!("; accepted: {accepted}")), "{err}");
            }
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let reason = |input: &str| memory_mib("m", input).unwrap_err().reason;
        assert_eq!(reason("0Mi"), "it is zero");
        assert_eq!(reason("512mi"), "the suffix \"mi\" is not a memory unit");
        assert_eq!(reason("1.2.3Mi"), "it is not a plain decimal number");
        assert_eq!(reason("99999999Ei"), "it is too large");
        assert_eq!(
            vcpus("c", "0.0000000001").unwrap_err().reason,
            "it has more than 9 digits after the point"
        );
    }

    #[test]
    fn long_inputs_are_refused_and_cut_in_the_message() {
        let long = "1".repeat(10_000);
        let err = vcpus("cpu", &long).unwrap_err();
        assert_eq!(
            err.reason,
            format!("it is longer than {MAX_QUANTITY_LEN} bytes")
        );
        assert_eq!(err.input.len(), MAX_QUANTITY_LEN);
        let multibyte = "é".repeat(100);
        let err = memory_mib("mem", &multibyte).unwrap_err();
        assert!(err.input.len() <= MAX_QUANTITY_LEN);
    }
}
