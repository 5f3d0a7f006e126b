//! Globs as OpenShell's policy files write them: for request paths and query values,
//! and for the first label of a host.

/// A compiled glob: `*` matches any run of characters (crossing `/`; `**` is the same),
/// `?` one character, `[a-z0-9]` / `[!0]` a class; every other character itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob {
    source: String,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyOne,
    AnyRun,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Glob {
    /// Compiles `source`; the error says what is wrong with it.
    pub(crate) fn new(source: &str) -> Result<Glob, String> {
        let mut tokens = Vec::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => {
                    while chars.peek() == Some(&'*') {
                        chars.next();
                    }
                    tokens.push(Token::AnyRun);
                }
                '?' => tokens.push(Token::AnyOne),
                '[' => {
                    let negated = chars.next_if_eq(&'!').is_some();
                    let mut ranges = Vec::new();
                    let mut closed = false;
                    while let Some(first) = chars.next() {
                        if first == ']' && !ranges.is_empty() {
                            closed = true;
                            break;
                        }
                        let last = if chars.peek() == Some(&'-') {
                            chars.next();
                            match chars.next() {
                                Some(']') | None => {
                                    return Err(format!("unfinished range in class in {source:?}"))
                                }
                                Some(end) => end,
                            }
                        } else {
                            first
                        };
                        if last < first {
                            return Err(format!("reversed range {first}-{last} in {source:?}"));
                        }
                        ranges.push((first, last));
                    }
                    if !closed {
                        return Err(format!("unclosed [ in {source:?}"));
                    }
                    tokens.push(Token::Class { negated, ranges });
                }
                _ => tokens.push(Token::Literal(c)),
            }
        }
        Ok(Glob {
            source: source.to_string(),
            tokens,
        })
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `text` matches. Linear in `text` for each `*` restart: the
    /// classic single-backtrack-point algorithm, so hostile inputs cannot blow it up.
    pub(crate) fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let (mut t, mut p) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.tokens.get(p) {
                Some(Token::AnyRun) => {
                    star = Some((p, t));
                    p += 1;
                }
                Some(token) if token.matches_one(text[t]) => {
                    p += 1;
                    t += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        self.tokens[p.min(self.tokens.len())..]
            .iter()
            .all(|token| *token == Token::AnyRun)
    }
}

impl Token {
    fn matches_one(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::AnyOne => true,
            Token::AnyRun => false,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, text: &str) -> bool {
        Glob::new(pattern).unwrap().matches(text)
    }

    #[test]
    fn stars_match_any_run_and_cross_slashes() {
        assert!(m("/repos/*/issues", "/repos/a/issues"));
        assert!(m("/repos/*/issues", "/repos/a/b/issues"));
        assert!(m("/repos/**", "/repos/"));
        assert!(m("/repos/**", "/repos/x/y"));
        assert!(!m("/repos/**", "/repo"));
        assert!(m("**", ""));
        assert!(m("/**/info/refs*", "/org/repo.git/info/refs"));
        assert!(!m("/a*c", "/abd"));
        assert!(m("*a*a*a*a*a*b", &("a".repeat(60) + "b")));
        assert!(!m("*a*a*a*a*a*b", &"a".repeat(3000)));
    }

    #[test]
    fn question_marks_and_classes() {
        assert!(m("/v?/x", "/v1/x"));
        assert!(!m("/v?/x", "/v10/x"));
        assert!(m("/v[0-9]", "/v7"));
        assert!(!m("/v[!0]", "/v0"));
        assert!(m("/v[!0]", "/v1"));
        assert!(m("[]]", "]"));
    }

    proptest::proptest! {
        #[test]
        fn literal_globs_match_only_themselves(p in "[a-z/.-]{0,12}", t in "[a-z/.-]{0,12}") {
            proptest::prop_assert_eq!(m(&p, &t), p == t);
            proptest::prop_assert!(m(&p, &p));
        }

        #[test]
        fn starred_globs_match_containment(p in "[a-z/.-]{0,6}", t in "[a-z/.-]{0,16}") {
            proptest::prop_assert_eq!(m(&format!("*{p}*"), &t), t.contains(&p));
            proptest::prop_assert_eq!(m(&format!("{p}*"), &t), t.starts_with(&p));
            proptest::prop_assert_eq!(m(&format!("*{p}"), &t), t.ends_with(&p));
        }
    }

    #[test]
    fn malformed_globs_are_errors() {
        assert!(Glob::new("/a[").is_err());
        assert!(Glob::new("/a[z-a]").is_err());
        assert!(Glob::new("/a[a-]").is_err());
    }
}
