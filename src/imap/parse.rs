//! IMAP command syntax (RFC 3501 §9): a tag, a command name and arguments, tokenised into atoms,
//! strings and parenthesised lists. Literals are collected by the reader in `session` before
//! this runs, within a fixed bound, so nothing here allocates more than the line it is given.

/// One argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// An atom, including FETCH attributes such as `BODY.PEEK[HEADER.FIELDS (FROM)]<0.10>`.
    Atom(String),
    /// A quoted string or literal.
    Str(Vec<u8>),
    List(Vec<Token>),
    Nil,
}

impl Token {
    /// An astring (RFC 3501): an atom or a string, as text.
    pub fn astring(&self) -> Option<String> {
        match self {
            Token::Atom(a) => Some(a.clone()),
            Token::Str(s) => String::from_utf8(s.clone()).ok(),
            _ => None,
        }
    }
}

/// A command line split into tag, name (uppercased) and arguments.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub tag: String,
    pub name: String,
    pub args: Vec<Token>,
}

/// Deeper nesting than any real client sends; bounds recursion on hostile input.
const MAX_DEPTH: usize = 16;

/// Where a literal was left in the text by the reader: a NUL byte, then the literal's index.
/// NUL cannot appear in IMAP command text, so the marker is unambiguous.
pub const LITERAL_MARK: u8 = 0;

pub fn parse_request(line: &[u8], literals: &mut Vec<Vec<u8>>) -> Result<Request, (Option<String>, &'static str)> {
    let mut p = Parser { s: line, pos: 0, literals };
    let tag = p.atom_text().ok_or((None, "Missing tag"))?;
    if tag.contains(['+', '*']) {
        return Err((None, "Invalid tag"));
    }
    if !p.eat(b' ') {
        return Err((Some(tag), "Missing command"));
    }
    let name = match p.atom_text() {
        Some(n) => n.to_ascii_uppercase(),
        None => return Err((Some(tag), "Missing command")),
    };
    let mut args = Vec::new();
    while p.eat(b' ') {
        match p.token(0) {
            Some(t) => args.push(t),
            None => return Err((Some(tag), "Syntax error in arguments")),
        }
    }
    if p.pos != line.len() {
        return Err((Some(tag), "Syntax error in arguments"));
    }
    Ok(Request { tag, name, args })
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    literals: &'a mut Vec<Vec<u8>>,
}

/// Atom characters, widened to what commands carry in atom position: flags (`\\Seen`), LIST
/// wildcards (`*`, `%`) and `]` of section specs.
fn is_atom_char(b: u8) -> bool {
    b > b' ' && b < 0x7f && !b"(){\"".contains(&b)
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn atom_text(&mut self) -> Option<String> {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if b == b'[' {
                // A section spec: everything up to the matching ']' belongs to the atom.
                let close = self.s[self.pos..].iter().position(|&c| c == b']')?;
                self.pos += close + 1;
            } else if is_atom_char(b) {
                self.pos += 1;
            } else {
                break;
            }
        }
        if self.pos == start {
            return None;
        }
        String::from_utf8(self.s[start..self.pos].to_vec()).ok()
    }

    fn token(&mut self, depth: usize) -> Option<Token> {
        match self.peek()? {
            b'"' => self.quoted().map(Token::Str),
            b'(' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.pos += 1;
                let mut items = Vec::new();
                if self.eat(b')') {
                    return Some(Token::List(items));
                }
                loop {
                    items.push(self.token(depth + 1)?);
                    if self.eat(b')') {
                        return Some(Token::List(items));
                    }
                    if !self.eat(b' ') {
                        return None;
                    }
                }
            }
            LITERAL_MARK => {
                self.pos += 1;
                let start = self.pos;
                while self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    self.pos += 1;
                }
                let idx: usize = std::str::from_utf8(&self.s[start..self.pos]).ok()?.parse().ok()?;
                let lit = std::mem::take(self.literals.get_mut(idx)?);
                Some(Token::Str(lit))
            }
            _ => {
                let a = self.atom_text()?;
                if a.eq_ignore_ascii_case("NIL") {
                    Some(Token::Nil)
                } else {
                    Some(Token::Atom(a))
                }
            }
        }
    }

    fn quoted(&mut self) -> Option<Vec<u8>> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.pos += 1;
                    let c = self.peek()?;
                    if c != b'\\' && c != b'"' {
                        return None;
                    }
                    out.push(c);
                    self.pos += 1;
                }
                b'\r' | b'\n' => return None,
                c => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

/// A sequence set (`1:4,7,9:*`) as inclusive ranges; `*` is `max`.
pub fn parse_sequence_set(s: &str, max: u32) -> Option<Vec<(u32, u32)>> {
    let num = |x: &str| -> Option<u32> {
        if x == "*" {
            Some(max)
        } else if !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()) {
            x.parse().ok().filter(|&n| n > 0)
        } else {
            None
        }
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        out.push((a.min(b), a.max(b)));
    }
    Some(out)
}

/// `{n}` or `{n+}` at the end of a line: (text before it, n, synchronising).
pub fn literal_suffix(line: &[u8]) -> Option<(&[u8], u64, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let sync = match digits.strip_suffix(b"+") {
        Some(d) => {
            digits = d;
            false
        }
        None => true,
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((&line[..open], n, sync))
}

pub fn in_set(set: &[(u32, u32)], n: u32) -> bool {
    set.iter().any(|&(a, b)| a <= n && n <= b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Request {
        parse_request(s.as_bytes(), &mut Vec::new()).unwrap()
    }

    #[test]
    fn commands() {
        let r = req("a1 UID fetch 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (From To)]<0.100>)");
        assert_eq!(r.tag, "a1");
        assert_eq!(r.name, "UID");
        assert_eq!(
            r.args,
            vec![
                Token::Atom("fetch".into()),
                Token::Atom("1:*".into()),
                Token::List(vec![
                    Token::Atom("FLAGS".into()),
                    Token::Atom("BODY.PEEK[HEADER.FIELDS (From To)]<0.100>".into())
                ])
            ]
        );
        let r = req("x LOGIN \"us\\\"er\" pass");
        assert_eq!(r.args, vec![Token::Str(b"us\"er".to_vec()), Token::Atom("pass".into())]);
        let mut lits = vec![b"sec ret".to_vec()];
        let r = parse_request(b"x LOGIN user \x000", &mut lits).unwrap();
        assert_eq!(r.args[1], Token::Str(b"sec ret".to_vec()));
        assert_eq!(req("t LIST \"\" *").args[1], Token::Atom("*".into()));
    }

    #[test]
    fn bad_syntax_is_refused_not_panicked() {
        for bad in ["", " ", "a", "+ x", "a LOGIN \"unterminated", "a X ((((", "a X )", "a X \x009"] {
            assert!(parse_request(bad.as_bytes(), &mut Vec::new()).is_err(), "{bad:?}");
        }
        let deep = format!("a X {}", "(".repeat(100));
        assert!(parse_request(deep.as_bytes(), &mut Vec::new()).is_err());
    }

    #[test]
    fn sequence_sets() {
        assert_eq!(parse_sequence_set("1:3,5,*", 9), Some(vec![(1, 3), (5, 5), (9, 9)]));
        assert_eq!(parse_sequence_set("4:2", 9), Some(vec![(2, 4)]));
        assert_eq!(parse_sequence_set("0", 9), None);
        assert_eq!(parse_sequence_set("1,,2", 9), None);
    }
}
