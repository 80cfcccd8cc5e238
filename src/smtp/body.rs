//! The message body as it arrives after DATA or BDAT: a byte-at-a-time state machine that
//! removes dot-stuffing, finds the end of DATA, and checks the rules a body must keep. It never
//! buffers: the caller hands it whatever was read and gets back the content to store.
//!
//! Only `CRLF . CRLF` ends DATA (RFC 5321 §4.1.1.4). A bare CR or LF anywhere is an error that
//! rejects the message, so `LF . LF`, `LF . CRLF` and friends can never be read as an end of data
//! by us while a later hop reads them otherwise (SMTP smuggling).

/// Why a body is refused; reported after the whole body was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareLineEnding,
    /// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF.
    LineTooLong,
    /// Larger than the SIZE limit.
    TooBig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    LineStart,
    Mid,
    Cr,
    /// A dot at the start of a line (DATA only).
    Dot,
    /// `.` then CR at the start of a line (DATA only).
    DotCr,
}

pub const MAX_LINE: usize = 1000;

pub struct BodyScanner {
    state: State,
    dot_stuffed: bool,
    line_len: usize,
    size: u64,
    max_size: u64,
    violation: Option<Violation>,
}

/// What one call to `scan` found.
pub struct Scan {
    /// Input bytes consumed (all of them unless the end of DATA was found).
    pub consumed: usize,
    /// The end of DATA was reached.
    pub done: bool,
}

impl BodyScanner {
    /// `dot_stuffed`: DATA framing; false for BDAT chunks (length-framed, no dots).
    pub fn new(dot_stuffed: bool, max_size: u64) -> Self {
        BodyScanner { state: State::LineStart, dot_stuffed, line_len: 0, size: 0, max_size, violation: None }
    }

    pub fn violation(&self) -> Option<Violation> {
        self.violation
    }

    /// Content bytes accepted so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn flag(&mut self, v: Violation) {
        // The first violation is the one reported; size overruns win as they stop storage.
        if self.violation.is_none() || v == Violation::TooBig {
            self.violation = Some(v);
        }
    }

    /// Scans `input`, appending body content to `out` (nothing more once a violation is found).
    pub fn scan(&mut self, input: &[u8], out: &mut Vec<u8>) -> Scan {
        for (i, &b) in input.iter().enumerate() {
            // The limit counts the CRLF (RFC 5321 §4.5.3.1.6): 998 octets of text at most.
            self.line_len += 1;
            if self.line_len > MAX_LINE {
                self.flag(Violation::LineTooLong);
            }
            match (self.state, b) {
                (State::LineStart, b'.') if self.dot_stuffed => self.state = State::Dot,
                (State::LineStart | State::Mid, b'\r') => self.state = State::Cr,
                (State::Cr, b'\n') => {
                    self.emit(b"\r\n", out);
                    self.state = State::LineStart;
                    self.line_len = 0;
                }
                (State::Cr, _) => {
                    self.flag(Violation::BareLineEnding);
                    self.emit(b"\r", out);
                    self.state = State::Mid;
                    self.again(b, out);
                }
                (State::Dot, b'\r') => self.state = State::DotCr,
                (State::Dot, _) => {
                    // RFC 5321 §4.5.2: the leading dot of a stuffed line is removed.
                    self.state = State::Mid;
                    self.again(b, out);
                }
                (State::DotCr, b'\n') => {
                    self.state = State::LineStart;
                    return Scan { consumed: i + 1, done: true };
                }
                (State::DotCr, _) => {
                    self.flag(Violation::BareLineEnding);
                    self.emit(b"\r", out);
                    self.state = State::Mid;
                    self.again(b, out);
                }
                (_, b'\n') => {
                    self.flag(Violation::BareLineEnding);
                    self.emit(b"\n", out);
                    self.state = State::Mid;
                }
                (_, _) => {
                    self.emit(&[b], out);
                    self.state = State::Mid;
                }
            }
        }
        Scan { consumed: input.len(), done: false }
    }

    /// Handles a byte that follows a state that was just resolved (never CR-LF bookkeeping).
    fn again(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                self.flag(Violation::BareLineEnding);
                self.emit(b"\n", out);
            }
            _ => self.emit(&[b], out),
        }
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.size += bytes.len() as u64;
        if self.size > self.max_size {
            self.flag(Violation::TooBig);
        }
        if self.violation.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    /// For BDAT LAST: a body must end at a line boundary, with no half CR pending.
    pub fn finish_chunked(&mut self) {
        if self.state == State::Cr {
            self.flag(Violation::BareLineEnding);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], split: usize) -> (Vec<u8>, Option<usize>, Option<Violation>) {
        let mut s = BodyScanner::new(true, 1 << 20);
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + split).min(input.len());
            let r = s.scan(&input[pos..end], &mut out);
            pos += r.consumed;
            if r.done {
                return (out, Some(pos), s.violation());
            }
        }
        (out, None, s.violation())
    }

    #[test]
    fn unstuffs_and_ends_only_on_crlf_dot_crlf() {
        for split in [1, 2, 3, 1000] {
            let (out, end, v) = run(b"Subject: x\r\n\r\n..dot\r\n.\r\nNEXT", split);
            assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\n");
            assert_eq!(end, Some(24));
            assert_eq!(v, None);
        }
        assert_eq!(run(b".\r\n", 1), (vec![], Some(3), None));
    }

    #[test]
    fn smuggling_sequences_do_not_end_data_and_are_refused() {
        for evil in [&b"a\n.\nMAIL FROM:<x@y>\r\n"[..], b"a\n.\r\nMAIL", b"a\r\n.\nRCPT", b"a\r.\r\nX", b"a\r\n.\rX"] {
            let mut input = evil.to_vec();
            input.extend_from_slice(b"\r\n.\r\n");
            let (_, end, v) = run(&input, 1);
            assert_eq!(end, Some(input.len()), "only the final CRLF.CRLF ends {evil:?}");
            assert_eq!(v, Some(Violation::BareLineEnding), "{evil:?}");
        }
    }

    #[test]
    fn long_lines_and_size() {
        let mut input = vec![b'a'; 999];
        input.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(run(&input, 64).2, Some(Violation::LineTooLong), "999 + CRLF is 1001 octets");
        let mut ok = vec![b'a'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(run(&ok, 64).2, None);
        let mut s = BodyScanner::new(true, 10);
        let mut out = Vec::new();
        s.scan(b"0123456789abc\r\n", &mut out);
        assert_eq!(s.violation(), Some(Violation::TooBig));
        assert_eq!(out.len(), 10, "nothing beyond the limit is kept");
    }
}
