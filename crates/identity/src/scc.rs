//! OpenShift SCC namespace annotations: blocks of ids written `start/size` or `start-end`.

use std::fmt;

use crate::{quote, IdentityError, SUPPLEMENTAL_GROUPS_ANNOTATION, UID_RANGE_ANNOTATION};

/// A contiguous block of ids, `start ..= end()`. Always `size >= 1` and `end() <= u32::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdBlock {
    start: u32,
    size: u32,
}

impl IdBlock {
    /// The block `start .. start + size`, or `None` when it is empty or passes `u32::MAX`.
    pub fn new(start: u32, size: u32) -> Option<Self> {
        (size >= 1 && start.checked_add(size - 1).is_some()).then_some(Self { start, size })
    }

    /// First id of the block.
    pub fn start(&self) -> u32 {
        self.start
    }

    /// Number of ids in the block (at least 1).
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Last id of the block (inclusive).
    pub fn end(&self) -> u32 {
        self.start + (self.size - 1)
    }

    /// Whether `id` lies in the block.
    pub fn contains(&self, id: u32) -> bool {
        (self.start..=self.end()).contains(&id)
    }
}

/// `start/size`, the form OpenShift writes.
impl fmt::Display for IdBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.start, self.size)
    }
}

/// Parses `openshift.io/sa.scc.uid-range`; every comma-separated block must parse and
/// the first one is the namespace's uid range.
pub fn parse_uid_range(value: &str) -> Result<IdBlock, IdentityError> {
    let blocks = parse_blocks(UID_RANGE_ANNOTATION, value)?;
    Ok(blocks[0])
}

/// Parses `openshift.io/sa.scc.supplemental-groups`: one or more comma-separated blocks,
/// all of which must parse. The result is never empty.
pub fn parse_supplemental_groups(value: &str) -> Result<Vec<IdBlock>, IdentityError> {
    parse_blocks(SUPPLEMENTAL_GROUPS_ANNOTATION, value)
}

fn parse_blocks(annotation: &'static str, value: &str) -> Result<Vec<IdBlock>, IdentityError> {
    let invalid = |reason: String| IdentityError::InvalidAnnotation {
        annotation,
        value: quote(value.as_bytes()),
        reason,
    };
    if value.trim().is_empty() {
        return Err(invalid("it is empty".to_owned()));
    }
    value
        .split(',')
        .enumerate()
        .map(|(index, block)| {
            parse_block(block.trim()).map_err(|reason| {
                invalid(format!(
                    "block {} {}: {reason}",
                    index + 1,
                    quote(block.trim().as_bytes())
                ))
            })
        })
        .collect()
}

fn parse_block(block: &str) -> Result<IdBlock, String> {
    if block.is_empty() {
        return Err("it is empty".to_owned());
    }
    if let Some((start, size)) = block.split_once('/') {
        let (start, size) = (parse_u32(start, "start")?, parse_u32(size, "size")?);
        if size == 0 {
            return Err("size is 0".to_owned());
        }
        IdBlock::new(start, size)
            .ok_or_else(|| format!("start {start} + size {size} passes 4294967295"))
    } else if let Some((start, end)) = block.split_once('-') {
        let (start, end) = (parse_u32(start, "start")?, parse_u32(end, "end")?);
        if end < start {
            return Err(format!("end {end} is below start {start}"));
        }
        (end - start)
            .checked_add(1)
            .and_then(|size| IdBlock::new(start, size))
            .ok_or_else(|| format!("{start}-{end} holds more than 4294967295 ids"))
    } else {
        Err("it has neither '/' nor '-'".to_owned())
    }
}

fn parse_u32(text: &str, what: &str) -> Result<u32, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{what} {} is not a decimal number",
            quote(text.as_bytes())
        ));
    }
    text.parse()
        .map_err(|_| format!("{what} {text} does not fit in 32 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(start: u32, size: u32) -> IdBlock {
        IdBlock::new(start, size).unwrap()
    }

    #[test]
    fn both_forms_and_trimming() {
        assert_eq!(
            parse_uid_range("1000680000/10000"),
            Ok(block(1_000_680_000, 10_000))
        );
        assert_eq!(parse_uid_range("1000-1999"), Ok(block(1000, 1000)));
        assert_eq!(parse_uid_range("  5000/1 \n"), Ok(block(5000, 1)));
        assert_eq!(parse_uid_range("7-7"), Ok(block(7, 1)));
        assert_eq!(parse_uid_range("4294967295/1"), Ok(block(u32::MAX, 1)));
        assert_eq!(parse_uid_range("0-4294967294"), Ok(block(0, u32::MAX)));
        assert_eq!(
            parse_uid_range("1000/10,2000/5"),
            Ok(block(1000, 10)),
            "first block wins"
        );
        assert_eq!(
            parse_supplemental_groups(" 1000/10 , 3000-3004,9/1"),
            Ok(vec![block(1000, 10), block(3000, 5), block(9, 1)])
        );
    }

    #[test]
    fn block_accessors() {
        let b = block(1000, 10);
        assert_eq!((b.start(), b.size(), b.end()), (1000, 10, 1009));
        assert!(b.contains(1000) && b.contains(1009) && !b.contains(999) && !b.contains(1010));
        assert_eq!(b.to_string(), "1000/10");
        assert_eq!(IdBlock::new(1, 0), None);
        assert_eq!(IdBlock::new(u32::MAX, 2), None);
    }

    #[test]
    fn malformed_values_are_errors_naming_annotation_and_value() {
        let cases: &[(&str, &str)] = &[
            ("", "it is empty"),
            ("   ", "it is empty"),
            ("1000", "block 1 \"1000\": it has neither '/' nor '-'"),
            ("1000/0", "block 1 \"1000/0\": size is 0"),
            (
                "2000-1000",
                "block 1 \"2000-1000\": end 1000 is below start 2000",
            ),
            (
                "4294967295/2",
                "start 4294967295 + size 2 passes 4294967295",
            ),
            (
                "0-4294967295",
                "0-4294967295 holds more than 4294967295 ids",
            ),
            ("4294967296/1", "start 4294967296 does not fit in 32 bits"),
            ("1000/", "size \"\" is not a decimal number"),
            ("/10", "start \"\" is not a decimal number"),
            ("-1/10", "start \"-1\" is not a decimal number"),
            ("1-2-3", "end \"2-3\" is not a decimal number"),
            ("+1000/10", "start \"+1000\" is not a decimal number"),
            ("1000 / 10", "start \"1000 \" is not a decimal number"),
            ("1e3/10", "start \"1e3\" is not a decimal number"),
            ("1000/10/10", "size \"10/10\" is not a decimal number"),
            ("1000/10,", "block 2 \"\": it is empty"),
            ("1000/10,,2000/1", "block 2 \"\": it is empty"),
            ("1000/10,abc", "block 2 \"abc\": it has neither"),
        ];
        for (value, reason) in cases {
            for (annotation, result) in [
                (
                    UID_RANGE_ANNOTATION,
                    parse_uid_range(value).map(|b| vec![b]),
                ),
                (
                    SUPPLEMENTAL_GROUPS_ANNOTATION,
                    parse_supplemental_groups(value),
                ),
            ] {
                let err = result.expect_err(value).to_string();
                assert!(err.contains(annotation), "{err}");
                assert!(err.contains(&quote(value.as_bytes())), "{err}");
                assert!(err.contains(reason), "{value:?}: {err}");
                assert!(
                    err.contains("accepted: comma-separated blocks START/SIZE or START-END"),
                    "{err}"
                );
            }
        }
    }
}
