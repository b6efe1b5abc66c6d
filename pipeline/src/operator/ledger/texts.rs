//! The type and `data` text of the ledger's remembered metric-driving
//! events (all but usage), packed: a void of one of them parses its text
//! again, and nothing else ever reads it.
//!
//! These events are most of a billing stream, and the ledger keeps every
//! one for voids of any age, so the bytes per text set much of the
//! ledger's memory. Two things shrink them without losing a byte:
//!
//! - **Field names as one byte.** The spec fixes the fields each type's
//!   `data` carries, and their names (`"subscription_id":`, `"amount":`)
//!   are half of a typical text. Valid JSON never holds a raw byte below
//!   0x20 other than tab, newline and carriage return (control characters
//!   in strings must be escaped), so those 28 byte values stand for 28
//!   of the spec's field names and enumerated values (billing cycles,
//!   common currencies, aggregations); a text that uses none of them is
//!   stored as it came. Decoding swaps them back; only a void pays for
//!   it. A text holding such a byte anyway (the validator's parser would
//!   not let one through, but the ledger does not rely on it) is stored
//!   as it came, flagged in its header.
//! - **A short header.** An entry is its length as a LEB128 varint (one
//!   byte up to 127), its type (the index in `METRIC_TYPES`, with
//!   [`RAW`] set for a text stored as it came) and the text.
//!
//! Entries are appended to chunks of 1 MiB that never move or regrow:
//! memory grows by the entry and the unused end of a chunk an entry did
//! not fit in. A handle is the chunk's index in the high 32 bits and the
//! entry's offset in the low 32.

use crate::event::payload::METRIC_TYPES;

/// What each token byte stands for: a field name with its quotes and
/// colon, or a whole enumerated value with its quotes. Names first, those
/// of the billing events first; every entry starts with `"`.
const TOKENS: [(u8, &[u8]); 28] = [
    (0x01, b"\"subscription_id\":"),
    (0x02, b"\"plan\":"),
    (0x03, b"\"billing_cycle\":"),
    (0x04, b"\"price\":"),
    (0x05, b"\"currency\":"),
    (0x06, b"\"invoice_id\":"),
    (0x07, b"\"amount\":"),
    (0x08, b"\"reason\":"),
    (0x0B, b"\"trial_ends_at\":"),
    (0x0C, b"\"effective_at\":"),
    (0x0E, b"\"billing_anchor\":"),
    (0x0F, b"\"name\":"),
    (0x10, b"\"limits\":"),
    (0x11, b"\"overage\":"),
    (0x12, b"\"unit_price\":"),
    (0x13, b"\"per\":"),
    (0x14, b"\"metric\":"),
    (0x15, b"\"aggregation\":"),
    (0x16, b"\"group_by\":"),
    (0x17, b"\"model\":"),
    (0x18, b"\"monthly\""),
    (0x19, b"\"yearly\""),
    (0x1A, b"\"USD\""),
    (0x1B, b"\"EUR\""),
    (0x1C, b"\"GBP\""),
    (0x1D, b"\"sum\""),
    (0x1E, b"\"max\""),
    (0x1F, b"\"latest\""),
];

/// Set in an entry's type byte when its text is stored as it came.
const RAW: u8 = 0x80;

/// Whether `byte` is one a token uses.
fn is_token_byte(byte: u8) -> bool {
    byte < 0x20 && !matches!(byte, 0 | b'\t' | b'\n' | b'\r')
}

/// The token standing for `quoted` (a string with its quotes, and its
/// colon when it is a field name), if any.
fn token_of(quoted: &[u8]) -> Option<u8> {
    TOKENS
        .iter()
        .find(|(_, text)| *text == quoted)
        .map(|(token, _)| *token)
}

/// What `byte` stands for, when it is a token.
fn expansion(byte: u8) -> Option<&'static [u8]> {
    if byte >= 0x20 {
        return None;
    }
    TOKENS
        .iter()
        .find(|(token, _)| *token == byte)
        .map(|(_, text)| *text)
}

/// Appends `json` to `out` with every token's text replaced by its byte.
/// `json` is valid JSON (it passed the validator), so a `"` outside a
/// string opens one, and the string ends at the next `"` not escaped.
fn pack(json: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < json.len() {
        if json[i] != b'"' {
            out.push(json[i]);
            i += 1;
            continue;
        }
        // The string json[i..=end]; escapes skip the byte after `\`.
        let mut end = i + 1;
        while end < json.len() && json[end] != b'"' {
            end += if json[end] == b'\\' { 2 } else { 1 };
        }
        let end = end.min(json.len() - 1);
        let with_colon = json.get(i..end + 2).filter(|s| s.last() == Some(&b':'));
        match with_colon
            .and_then(|s| token_of(s).map(|t| (t, s.len())))
            .or_else(|| token_of(&json[i..=end]).map(|t| (t, end + 1 - i)))
        {
            Some((token, len)) => {
                out.push(token);
                i += len;
            }
            None => {
                out.extend_from_slice(&json[i..=end]);
                i = end + 1;
            }
        }
    }
}

/// The text `packed` came from.
fn unpack(packed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(packed.len() * 2);
    for &b in packed {
        match expansion(b) {
            Some(text) => out.extend_from_slice(text),
            None => out.push(b),
        }
    }
    out
}

/// See the module documentation.
#[derive(Default)]
pub(super) struct Texts {
    chunks: Vec<Vec<u8>>,
    /// Reused for each entry's packed text before it is copied in.
    scratch: Vec<u8>,
}

impl Texts {
    pub(super) const NONE: u64 = u64::MAX;
    pub(super) const CHUNK: usize = 1 << 20;

    /// Stores `data` with its type (an index in `METRIC_TYPES`); the handle
    /// is [`Texts::NONE`] past 4 GiB of text.
    pub(super) fn push(&mut self, type_index: u8, data: &str) -> u64 {
        if data.bytes().any(is_token_byte) {
            return self.append(type_index | RAW, data.as_bytes());
        }
        let mut packed = std::mem::take(&mut self.scratch);
        packed.clear();
        pack(data.as_bytes(), &mut packed);
        let handle = self.append(type_index, &packed);
        self.scratch = packed;
        handle
    }

    fn append(&mut self, type_index: u8, packed: &[u8]) -> u64 {
        let Ok(len) = u32::try_from(packed.len()) else {
            return Texts::NONE;
        };
        let mut header = [0u8; 6];
        let mut n = 0;
        let mut rest = len;
        loop {
            let low = (rest & 0x7F) as u8;
            rest >>= 7;
            header[n] = if rest == 0 { low } else { low | 0x80 };
            n += 1;
            if rest == 0 {
                break;
            }
        }
        header[n] = type_index;
        n += 1;
        let need = packed.len() + n;
        let fits = self
            .chunks
            .last()
            .is_some_and(|c| c.capacity() - c.len() >= need);
        if !fits {
            self.chunks.push(Vec::with_capacity(need.max(Texts::CHUNK)));
        }
        let chunk_index = self.chunks.len() - 1;
        let Some(chunk) = self.chunks.last_mut() else {
            return Texts::NONE;
        };
        let (Ok(c), Ok(offset)) = (u32::try_from(chunk_index), u32::try_from(chunk.len())) else {
            return Texts::NONE;
        };
        chunk.extend_from_slice(&header[..n]);
        chunk.extend_from_slice(packed);
        (u64::from(c) << 32) | u64::from(offset)
    }

    /// The type and text behind `handle`.
    pub(super) fn get(&self, handle: u64) -> Option<(&'static str, String)> {
        let chunk = self.chunks.get((handle >> 32) as usize)?;
        let mut at = (handle as u32) as usize;
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let b = *chunk.get(at)?;
            at += 1;
            len |= usize::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 28 {
                return None;
            }
        }
        let type_byte = *chunk.get(at)?;
        let event_type = METRIC_TYPES.get(usize::from(type_byte & !RAW))?;
        let stored = chunk.get(at + 1..at + 1 + len)?;
        let text = if type_byte & RAW == 0 {
            String::from_utf8(unpack(stored)).ok()?
        } else {
            String::from_utf8(stored.to_vec()).ok()?
        };
        Some((event_type, text))
    }

    /// Bytes held in chunks (for tests of the packing).
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    #[cfg(test)]
    fn chunks(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_give_back_what_was_put_across_chunks() {
        let mut texts = Texts::default();
        let big = "x".repeat(Texts::CHUNK + 10);
        let mut handles = Vec::new();
        for i in 0..3000u32 {
            let data = format!(
                "{{\"n\":{i},\"currency\":\"USD\",\"pad\":\"{}\"}}",
                "y".repeat((i % 700) as usize)
            );
            handles.push((texts.push((i % 10) as u8, &data), i % 10, data));
            if i == 1500 {
                handles.push((texts.push(3, &big), 3, big.clone()));
            }
        }
        assert!(texts.chunks() > 2, "the test spans chunks");
        for (h, t, data) in &handles {
            let (event_type, text) = texts.get(*h).expect("an entry");
            assert_eq!(event_type, METRIC_TYPES[*t as usize]);
            assert_eq!(&text, data);
        }
        assert_eq!(texts.get(Texts::NONE), None);
    }

    #[test]
    fn field_names_and_values_pack_and_come_back_exactly() {
        let cases = [
            r#"{"subscription_id":"sub_1","plan":"pro","billing_cycle":"monthly","price":4900,"currency":"USD"}"#,
            r#"{"invoice_id":"inv_1","amount":28986,"currency":"EUR"}"#,
            // Spaces, escapes and look-alikes stay as they are.
            r#"{ "plan" : "pro", "name":"a \"plan\": x", "plans":"USD", "USD":"monthly"}"#,
            r#"{"name":"\\","reason":"\"USD\"","x":["monthly","yearly"]}"#,
            r#"{"limits":{"api_calls":1000},"overage":{"api_calls":{"unit_price":100,"per":1000}}}"#,
            "{\"name\":\"tab\\tand unicode é ✓\",\"amount\":-1}",
            "{}",
            "[]",
            "\"plan\"",
            "null",
            r#"{"":""}"#,
        ];
        for case in cases {
            let mut packed = Vec::new();
            pack(case.as_bytes(), &mut packed);
            assert_eq!(
                String::from_utf8(unpack(&packed)).expect("utf-8"),
                case,
                "{case}"
            );
        }
        let mut packed = Vec::new();
        pack(cases[1].as_bytes(), &mut packed);
        assert_eq!(packed.len(), cases[1].len() - 34, "three names and a value");
    }

    #[test]
    fn a_text_holding_a_token_byte_is_kept_as_it_came() {
        let mut texts = Texts::default();
        let odd = "{\"plan\":\"a\u{1}b\"}";
        let h = texts.push(4, odd);
        assert_eq!(texts.get(h), Some((METRIC_TYPES[4], odd.to_owned())));
    }

    #[test]
    fn a_billing_text_takes_about_half_its_bytes() {
        let mut texts = Texts::default();
        let data = r#"{"subscription_id":"sub_t0091_1","plan":"free","billing_cycle":"monthly","price":0,"currency":"USD"}"#;
        texts.push(3, data);
        assert!(
            texts.bytes() * 2 <= data.len() + 8,
            "{} bytes for {}",
            texts.bytes(),
            data.len()
        );
    }

    #[test]
    fn every_token_is_a_byte_valid_json_never_holds_raw() {
        for (token, text) in TOKENS {
            assert!(is_token_byte(token));
            assert_eq!(text[0], b'"');
            assert_eq!(expansion(token), Some(text));
        }
        let mut seen: Vec<u8> = TOKENS.iter().map(|(t, _)| *t).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), TOKENS.len());
    }
}
