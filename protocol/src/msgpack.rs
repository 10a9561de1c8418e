//! A MessagePack pre-scan: walks an encoded document without building it, checking nesting depth
//! and that every declared length fits in the bytes that remain. Run before deserializing, so a
//! hostile payload (a length of four billion in a ten-byte frame, ten thousand nested arrays) is
//! refused before anything is allocated for it.

use crate::error::ProtocolError;

/// Checks `input` holds exactly one MessagePack value, nested at most `max_depth` deep, with
/// every length inside the input.
pub fn check(input: &[u8], max_depth: usize) -> Result<(), ProtocolError> {
    let mut pos = 0usize;
    // Values still to read at each open level (arrays count items; maps count keys + values).
    let mut pending: Vec<u64> = vec![1];
    while let Some(top) = pending.last_mut() {
        if *top == 0 {
            pending.pop();
            continue;
        }
        *top -= 1;
        let marker = *input.get(pos).ok_or(ProtocolError::Truncated)?;
        pos += 1;
        let skip = |pos: &mut usize, n: u64| -> Result<(), ProtocolError> {
            let available = (input.len() - *pos) as u64;
            if n > available {
                return Err(ProtocolError::LengthOutOfBounds {
                    declared: n,
                    available,
                });
            }
            *pos += n as usize;
            Ok(())
        };
        let container = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => None,
            0x80..=0x8f => Some(2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => Some(u64::from(marker & 0x0f)),
            0xa0..=0xbf => {
                skip(&mut pos, u64::from(marker & 0x1f))?;
                None
            }
            0xc4 | 0xd9 => {
                let n = read_be(input, pos, 1)?;
                pos += 1;
                skip(&mut pos, n)?;
                None
            }
            0xc5 | 0xda => {
                let n = read_be(input, pos, 2)?;
                pos += 2;
                skip(&mut pos, n)?;
                None
            }
            0xc6 | 0xdb => {
                let n = read_be(input, pos, 4)?;
                pos += 4;
                skip(&mut pos, n)?;
                None
            }
            // ext 8/16/32: length, type byte, data
            0xc7..=0xc9 => {
                let width = match marker {
                    0xc7 => 1,
                    0xc8 => 2,
                    _ => 4,
                };
                let n = read_be(input, pos, width)?;
                pos += width;
                skip(&mut pos, n + 1)?;
                None
            }
            0xca => skip(&mut pos, 4).map(|()| None)?,
            0xcb => skip(&mut pos, 8).map(|()| None)?,
            0xcc | 0xd0 => skip(&mut pos, 1).map(|()| None)?,
            0xcd | 0xd1 => skip(&mut pos, 2).map(|()| None)?,
            0xce | 0xd2 => skip(&mut pos, 4).map(|()| None)?,
            0xcf | 0xd3 => skip(&mut pos, 8).map(|()| None)?,
            // fixext 1/2/4/8/16: type byte + data
            0xd4 => skip(&mut pos, 2).map(|()| None)?,
            0xd5 => skip(&mut pos, 3).map(|()| None)?,
            0xd6 => skip(&mut pos, 5).map(|()| None)?,
            0xd7 => skip(&mut pos, 9).map(|()| None)?,
            0xd8 => skip(&mut pos, 17).map(|()| None)?,
            0xdc => {
                let n = read_be(input, pos, 2)?;
                pos += 2;
                Some(n)
            }
            0xdd => {
                let n = read_be(input, pos, 4)?;
                pos += 4;
                Some(n)
            }
            0xde => {
                let n = read_be(input, pos, 2)?;
                pos += 2;
                Some(2 * n)
            }
            0xdf => {
                let n = read_be(input, pos, 4)?;
                pos += 4;
                Some(2 * n)
            }
            0xc1 => {
                return Err(ProtocolError::Malformed(
                    "reserved MessagePack marker 0xc1".into(),
                ));
            }
        };
        if let Some(items) = container {
            // Every item takes at least one byte.
            let available = (input.len() - pos) as u64;
            if items > available {
                return Err(ProtocolError::LengthOutOfBounds {
                    declared: items,
                    available,
                });
            }
            if pending.len() >= max_depth {
                return Err(ProtocolError::TooDeep { limit: max_depth });
            }
            pending.push(items);
        }
    }
    if pos != input.len() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes",
            input.len() - pos
        )));
    }
    Ok(())
}

fn read_be(input: &[u8], pos: usize, width: usize) -> Result<u64, ProtocolError> {
    let bytes = input
        .get(pos..pos + width)
        .ok_or(ProtocolError::Truncated)?;
    Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_rmp_serde_writes() {
        let value = (
            1u8,
            "text",
            vec![1.5f64, -2.0],
            [(String::from("k"), vec![0u8; 300])],
        );
        let bytes = rmp_serde::to_vec(&value).unwrap();
        check(&bytes, 16).unwrap();
    }

    #[test]
    fn a_huge_declared_length_in_a_tiny_input_is_refused() {
        // array32 claiming 4,000,000,000 items, then five bytes.
        let input = [0xdd, 0xee, 0x6b, 0x28, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05];
        assert!(matches!(
            check(&input, 64),
            Err(ProtocolError::LengthOutOfBounds {
                declared: 4_000_000_000,
                ..
            })
        ));
        // bin32 claiming 4 GB.
        let input = [0xc6, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00];
        assert!(matches!(
            check(&input, 64),
            Err(ProtocolError::LengthOutOfBounds { .. })
        ));
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let mut input = vec![0x91; 10_000];
        input.push(0xc0);
        assert!(matches!(
            check(&input, 64),
            Err(ProtocolError::TooDeep { limit: 64 })
        ));
        let mut shallow = vec![0x91; 10];
        shallow.push(0xc0);
        check(&shallow, 64).unwrap();
    }

    #[test]
    fn truncated_and_trailing_input_is_refused() {
        let bytes = rmp_serde::to_vec(&("abc", 1234567u32)).unwrap();
        for cut in 0..bytes.len() {
            assert!(check(&bytes[..cut], 16).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(check(&longer, 16).is_err());
        assert!(check(&[0xc1], 16).is_err());
    }
}
