//! SMTP replies with RFC 3463 enhanced status codes.

use std::fmt::Write;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: &'static str,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Self {
        Reply { code, status, text: text.into() }
    }

    /// The wire form: CRLF-terminated; multi-line text becomes `250-` continuation lines.
    pub fn render(&self, out: &mut Vec<u8>) {
        let lines: Vec<&str> = self.text.split('\n').collect();
        let mut s = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            if self.status.is_empty() {
                let _ = write!(s, "{}{}{}\r\n", self.code, sep, line);
            } else {
                let _ = write!(s, "{}{}{} {}\r\n", self.code, sep, self.status, line);
            }
        }
        out.extend_from_slice(s.as_bytes());
    }

    pub fn is_error(&self) -> bool {
        self.code >= 400
    }
}
