//! Finds where a chunked message body ends without decoding it, so that
//! the engine can pass the body on byte for byte (trailers included) and
//! know when the connection is free for the next message.

/// Where the scanner is in the chunked framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// In a chunk-size line: the size so far, digits seen, and whether a
    /// chunk extension (`;…`) started.
    Size {
        size: u64,
        digits: u8,
        ext: bool,
    },
    /// After the CR of a size line.
    SizeLf {
        size: u64,
        digits: u8,
    },
    /// Chunk data still to come.
    Data(u64),
    /// The CRLF after chunk data.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// In a trailer field line.
    Trailer,
    /// After the CR of the final empty line.
    EndLf,
    Done,
}

/// The framing is not valid chunked encoding.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid chunked encoding")]
pub(crate) struct InvalidChunk;

/// The longest chunk size the scanner accepts, in hex digits.
const MAX_SIZE_DIGITS: u8 = 15;

#[derive(Debug)]
pub(crate) struct ChunkScanner {
    state: State,
}

impl Default for ChunkScanner {
    fn default() -> Self {
        ChunkScanner {
            state: State::Size {
                size: 0,
                digits: 0,
                ext: false,
            },
        }
    }
}

impl ChunkScanner {
    /// Scans `bytes`; returns how many belong to the body (all of them
    /// unless the body ends inside) and whether it ended.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), InvalidChunk> {
        let mut idx = 0;
        while idx < bytes.len() {
            if self.state == State::Done {
                break;
            }
            if let State::Data(left) = self.state {
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - idx);
                idx += take;
                let left = left - take as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data(left)
                };
                continue;
            }
            let byte = bytes[idx];
            idx += 1;
            self.state = match self.state {
                State::Size { size, digits, ext } => match byte {
                    b'\r' => State::SizeLf { size, digits },
                    b'\n' => after_size_line(size, digits)?,
                    b';' => State::Size {
                        size,
                        digits,
                        ext: true,
                    },
                    _ if ext => State::Size { size, digits, ext },
                    b' ' | b'\t' => State::Size { size, digits, ext },
                    _ => {
                        let digit = (byte as char).to_digit(16).ok_or(InvalidChunk)?;
                        if digits >= MAX_SIZE_DIGITS {
                            return Err(InvalidChunk);
                        }
                        State::Size {
                            size: size * 16 + u64::from(digit),
                            digits: digits + 1,
                            ext,
                        }
                    }
                },
                State::SizeLf { size, digits } => {
                    if byte != b'\n' {
                        return Err(InvalidChunk);
                    }
                    after_size_line(size, digits)?
                }
                State::DataCr => match byte {
                    b'\r' => State::DataLf,
                    b'\n' => size_start(),
                    _ => return Err(InvalidChunk),
                },
                State::DataLf => match byte {
                    b'\n' => size_start(),
                    _ => return Err(InvalidChunk),
                },
                State::TrailerStart => match byte {
                    b'\r' => State::EndLf,
                    b'\n' => State::Done,
                    _ => State::Trailer,
                },
                State::Trailer => match byte {
                    b'\n' => State::TrailerStart,
                    _ => State::Trailer,
                },
                State::EndLf => match byte {
                    b'\n' => State::Done,
                    _ => return Err(InvalidChunk),
                },
                State::Data(_) | State::Done => unreachable!("handled above"),
            };
        }
        Ok((idx, self.state == State::Done))
    }
}

fn size_start() -> State {
    State::Size {
        size: 0,
        digits: 0,
        ext: false,
    }
}

fn after_size_line(size: u64, digits: u8) -> Result<State, InvalidChunk> {
    if digits == 0 {
        return Err(InvalidChunk);
    }
    Ok(if size == 0 {
        State::TrailerStart
    } else {
        State::Data(size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8]) -> Result<(usize, bool), InvalidChunk> {
        ChunkScanner::default().feed(input)
    }

    #[test]
    fn finds_the_end_of_a_body() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT";
        assert_eq!(scan_all(body), Ok((body.len() - 4, true)));
    }

    #[test]
    fn trailers_belong_to_the_body() {
        let body = b"3\r\nabc\r\n0\r\nGrpc-Status: 0\r\nX-A: b\r\n\r\n";
        assert_eq!(scan_all(body), Ok((body.len(), true)));
    }

    #[test]
    fn any_split_gives_the_same_end() {
        let body = b"a\r\n0123456789\r\n1F\r\nabcdefghijklmnopqrstuvwxyz01234\r\n0\r\n\r\nrest";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut scanner = ChunkScanner::default();
            let (first, done) = scanner.feed(&body[..split]).expect("valid");
            assert_eq!(first, split.min(end));
            assert_eq!(done, split >= end, "split at {split}");
            if done {
                continue;
            }
            let (second, done) = scanner.feed(&body[split..]).expect("valid");
            assert!(done, "split at {split}");
            assert_eq!(split + second, end, "split at {split}");
        }
    }

    #[test]
    fn partial_bodies_are_not_done() {
        assert_eq!(scan_all(b"5\r\nhel"), Ok((6, false)));
        assert_eq!(scan_all(b"0\r\n"), Ok((3, false)));
        assert_eq!(scan_all(b"0\r\n\r"), Ok((4, false)));
    }

    #[test]
    fn refuses_invalid_framing() {
        assert_eq!(scan_all(b"x\r\n"), Err(InvalidChunk));
        assert_eq!(scan_all(b"\r\n"), Err(InvalidChunk));
        assert_eq!(scan_all(b"3\r\nabcX"), Err(InvalidChunk));
        assert_eq!(scan_all(b"ffffffffffffffff1\r\n"), Err(InvalidChunk));
    }
}
