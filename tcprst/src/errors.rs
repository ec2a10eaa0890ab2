//! Errors as the one line a log or a doctor report has room for.

use std::error::Error;

/// `err` and its causes on one line, joined with ": ". A cause whose text
/// the line already holds is left out: kube's and aya's messages embed some
/// of their causes but not always the one that says what failed ("client
/// error (Connect)" hides "Connection refused"). Only the first line is kept:
/// a verifier log can run to thousands.
pub fn one_line(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        cause = inner.source();
    }
    line.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use std::{fmt, io};

    use super::*;

    /// An error that says `text` and has `source` as its cause.
    #[derive(Debug)]
    struct Wrapped {
        text: &'static str,
        source: io::Error,
    }

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.text)
        }
    }

    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_hidden_cause_is_appended_and_an_embedded_one_is_not() {
        let hidden = Wrapped {
            text: "client error (Connect)",
            source: io::Error::other("Connection refused"),
        };
        assert_eq!(
            one_line(&hidden),
            "client error (Connect): Connection refused"
        );
        let embedded = Wrapped {
            text: "reading /x: Permission denied",
            source: io::Error::other("Permission denied"),
        };
        assert_eq!(one_line(&embedded), "reading /x: Permission denied");
    }

    #[test]
    fn only_the_first_line_is_kept() {
        let long = Wrapped {
            text: "the verifier refused it",
            source: io::Error::other("0: r1 = 0\n1: exit\nR0 !read_ok"),
        };
        assert_eq!(one_line(&long), "the verifier refused it: 0: r1 = 0");
    }
}
