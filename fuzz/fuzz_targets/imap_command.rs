//! The IMAP command parser on arbitrary input: it must refuse what it cannot read and never
//! panic, loop or recurse without bound. Besides the tokeniser: the literal-announcement check the
//! reader runs on each line, and sequence sets.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The server's own parser, compiled here by path (see Cargo.toml); it has no dependencies.
#[path = "../../src/imap/parse.rs"]
#[allow(dead_code)]
mod parse;

use parse::{in_set, literal_suffix, parse_request, parse_sequence_set, Token};

/// Input layout: the command line, then optional literals each introduced by a 0xff byte, so
/// that the literal markers (`\0<index>`) in the line can refer to real literals.
fn split(data: &[u8]) -> (&[u8], Vec<Vec<u8>>) {
    let mut parts = data.split(|&b| b == 0xff);
    let line = parts.next().unwrap_or_default();
    (line, parts.map(<[u8]>::to_vec).collect())
}

fn atoms(tokens: &[Token], out: &mut Vec<String>) {
    for t in tokens {
        match t {
            Token::Atom(a) => out.push(a.clone()),
            Token::List(l) => atoms(l, out),
            Token::Str(_) | Token::Nil => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (line, mut literals) = split(data);
    if let Some((prefix, _size, _sync)) = literal_suffix(line) {
        assert!(line.starts_with(prefix) && prefix.len() < line.len());
    }
    let Ok(req) = parse_request(line, &mut literals) else { return };
    assert!(!req.tag.is_empty());
    // Every atom as a sequence set, with a small and a huge `*`.
    let mut words = Vec::new();
    atoms(&req.args, &mut words);
    for w in &words {
        for max in [1, u32::MAX] {
            if let Some(set) = parse_sequence_set(w, max) {
                assert!(set.iter().all(|&(a, b)| 0 < a && a <= b && in_set(&set, a) && in_set(&set, b)));
            }
        }
    }
});
