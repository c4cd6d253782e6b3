//! LZ-string's base64 form (`compressToBase64`), which posthog-js sent as
//! `compression=lz64` before it moved to gzip. Decoded here within a
//! budget: LZ-string's dictionary entries grow by one character per code,
//! so a few megabytes of codes can describe terabytes of text, and the
//! decoder must stop once its output passes what the body may decode to.

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Lz64Error {
    /// Not LZ-string base64: a character outside its alphabet, a code that
    /// names no dictionary entry, or text that ends before its end code.
    Invalid(&'static str),
    /// The decoded text would pass the budget.
    TooLarge,
}

/// The value of one character of LZ-string's base64 alphabet (standard
/// base64, `=` padding read as zero bits).
fn sextet(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        b'=' => 0,
        _ => return None,
    } as u32)
}

/// Reads the compressed stream's bits, lowest first within each sextet's
/// most-significant-first order, as LZ-string writes them.
struct Bits<'a> {
    text: &'a [u8],
    next: usize,
    value: u32,
    mask: u32,
}

impl Bits<'_> {
    fn new(text: &[u8]) -> Result<Bits<'_>, Lz64Error> {
        let first = *text.first().ok_or(Lz64Error::Invalid("it is empty"))?;
        Ok(Bits {
            text,
            next: 1,
            value: sextet(first).ok_or(Lz64Error::Invalid("a character is not base64"))?,
            mask: 32,
        })
    }

    /// `count` bits as a number, the first read being the lowest. The next
    /// character is taken only when a bit of it is needed: the end code
    /// may finish exactly at the end of the text.
    fn read(&mut self, count: u32) -> Result<u32, Lz64Error> {
        let mut out = 0;
        for bit in 0..count {
            if self.mask == 0 {
                let c = *self
                    .text
                    .get(self.next)
                    .ok_or(Lz64Error::Invalid("it ends before its end code"))?;
                self.value = sextet(c).ok_or(Lz64Error::Invalid("a character is not base64"))?;
                self.next += 1;
                self.mask = 32;
            }
            if self.value & self.mask != 0 {
                out |= 1 << bit;
            }
            self.mask >>= 1;
        }
        Ok(out)
    }
}

/// What a dictionary entry costs beside its units, in units: its vector's
/// header and the allocator's overhead.
const ENTRY_OVERHEAD: usize = 16;

/// The text `compressed` holds, or an error once the output and the
/// dictionary would take more than `budget` UTF-16 code units of memory.
pub fn decompress(compressed: &str, budget: usize) -> Result<String, Lz64Error> {
    let mut bits = Bits::new(compressed.trim().as_bytes())?;
    // Codes 0, 1 and 2 mean "an 8-bit character follows", "a 16-bit one
    // follows" and "end"; the dictionary's own entries start at 3.
    let mut dictionary: Vec<Vec<u16>> = vec![Vec::new(); 3];
    let mut spent = 0usize;
    let mut charge = |units: usize| {
        spent += units;
        if spent > budget {
            Err(Lz64Error::TooLarge)
        } else {
            Ok(())
        }
    };
    let literal = |bits: &mut Bits, code: u32| -> Result<Option<u16>, Lz64Error> {
        match code {
            0 => Ok(Some(bits.read(8)? as u16)),
            1 => Ok(Some(bits.read(16)? as u16)),
            2 => Ok(None),
            _ => Err(Lz64Error::Invalid("its first code is not a character")),
        }
    };
    let kind = bits.read(2)?;
    let Some(first) = literal(&mut bits, kind)? else {
        return Ok(String::new());
    };
    let mut width = 3;
    // Codes left before the width grows by a bit.
    let mut until_wider = 4u64;
    dictionary.push(vec![first]);
    let mut previous = vec![first];
    let mut out = vec![first];
    charge(2 + ENTRY_OVERHEAD)?;
    loop {
        let mut code = bits.read(width)? as usize;
        match code {
            0 | 1 => {
                let unit = literal(&mut bits, code as u32)?.expect("0 and 1 are literals");
                dictionary.push(vec![unit]);
                charge(1 + ENTRY_OVERHEAD)?;
                code = dictionary.len() - 1;
                until_wider -= 1;
            }
            2 => break,
            _ => {}
        }
        if until_wider == 0 {
            until_wider = 1 << width;
            width += 1;
        }
        let entry = if let Some(entry) = dictionary.get(code) {
            entry.clone()
        } else if code == dictionary.len() {
            let mut entry = previous.clone();
            entry.push(previous[0]);
            entry
        } else {
            return Err(Lz64Error::Invalid("a code names no dictionary entry"));
        };
        charge(entry.len() * 2 + 1 + ENTRY_OVERHEAD)?;
        out.extend_from_slice(&entry);
        let mut grown = previous;
        grown.push(entry[0]);
        dictionary.push(grown);
        until_wider -= 1;
        previous = entry;
        if until_wider == 0 {
            until_wider = 1 << width;
            width += 1;
        }
        if width > 32 {
            return Err(Lz64Error::Invalid("its codes grow past 32 bits"));
        }
    }
    String::from_utf16(&out).map_err(|_| Lz64Error::Invalid("the text is not valid UTF-16"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_lz_string_encodes() {
        // Made by an independent implementation of LZ-string, the way
        // posthog-js did before its gzip support.
        for text in [
            "",
            "a",
            r#"{"event":"$pageview","properties":{"distinct_id":"u1","$current_url":"https://example.com/a?b=c"}}"#,
            "ééé ☃ 🦀 mixed units",
            &"abcabcabcabd".repeat(500),
        ] {
            let compressed = lz_str::compress_to_base64(text);
            assert_eq!(decompress(&compressed, 1 << 20).unwrap(), text, "{text:?}");
        }
    }

    #[test]
    fn a_small_body_that_expands_past_the_budget_is_refused() {
        let text = "a".repeat(200_000);
        let compressed = lz_str::compress_to_base64(&text);
        assert!(compressed.len() < 2_000, "{}", compressed.len());
        assert_eq!(decompress(&compressed, 300_000), Err(Lz64Error::TooLarge));
        assert_eq!(decompress(&compressed, 1 << 20).unwrap(), text);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in ["", "!!!!", "A", "AAAA", "////////"] {
            assert!(
                matches!(decompress(bad, 1 << 20), Err(Lz64Error::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_comes_back_as_it_went_in(text in "\\PC{0,400}") {
            let compressed = lz_str::compress_to_base64(&text);
            proptest::prop_assert_eq!(decompress(&compressed, 1 << 20).unwrap(), text);
        }

        #[test]
        fn any_input_is_decoded_or_refused_within_the_budget(input in "[A-Za-z0-9+/=]{0,200}") {
            match decompress(&input, 10_000) {
                Ok(text) => proptest::prop_assert!(text.encode_utf16().count() <= 10_000),
                Err(Lz64Error::Invalid(_) | Lz64Error::TooLarge) => {}
            }
        }
    }
}
