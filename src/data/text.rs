//! Reading corpus text files: a cheap up-front check that a file is text at all, and a streaming
//! reader that hands out bounded chunks cut where cutting cannot change the tokenization.
//!
//! Why chunks and not whole files: a corpus may not fit in memory. Why not single lines: a
//! pre-tokenizer regex sees whitespace runs across line ends, and a tokenizer may have merges
//! for them (GPT-2's `ĊĊ` for `"\n\n"`), so cutting at every line would encode the text
//! differently than encoding it whole.
//!
//! Where a cut is safe, for every byte-level regex in use (GPT-2, Llama 3, SmolLM), with `X`
//! and `Y` non-whitespace:
//!
//! - `X\n|Y`, a single newline between two non-space characters. Not `X\n\n|Y`: GPT-2's
//!   `\s+(?!\S)` splits the run `\n\n` before `Y` into `\n` `\n`, but takes it whole at the
//!   end of a chunk. Not `X\r\n|Y` either (GPT-2 `\r` `\n` versus `\r\n`).
//! - `X| Y`, before a single space between two non-space characters: every regex keeps the
//!   space with what follows. Used when a chunk finds no safe line end within 4× its target
//!   size (CRLF files, double-spaced text).
//!
//! Text with neither (no spaces, e.g. Chinese, and no single line breaks) is cut at a line end
//! anyway once a chunk reaches 4× its target: the one place encoding may differ slightly from
//! whole-text encoding.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How much of each file [`check_text_file`] inspects: enough to catch a binary file passed by
/// mistake, small enough to cost nothing on a large corpus.
const SNIFF_BYTES: usize = 1 << 20;

/// Longest piece read in one go. A file with no newlines (minified text, a dump on one line) is
/// cut into pieces of at most this size so memory stays bounded.
const MAX_PIECE_BYTES: usize = 1 << 20;

/// Check that `path` exists, is not empty and looks like UTF-8 text: no NUL byte and no invalid
/// UTF-8 in its first megabyte. Returns the file size in bytes.
///
/// The rest of the file is checked while it is streamed (see [`TextChunks`]); this early check
/// only makes the common mistake (a binary or a Latin-1 file) fail before any work is done.
pub fn check_text_file(path: &Path) -> Result<u64> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::data(path, "is a directory, expected a UTF-8 text file"));
    }
    if meta.len() == 0 {
        return Err(Error::data(path, "file is empty, expected UTF-8 text\nHINT: remove it from the input list"));
    }
    let mut head = Vec::with_capacity(SNIFF_BYTES.min(meta.len() as usize));
    (&mut file).take(SNIFF_BYTES as u64).read_to_end(&mut head).map_err(|e| Error::io(path, e))?;
    check_text_bytes(path, &head, 0, head.len() as u64 == meta.len())?;
    Ok(meta.len())
}

/// Reject NUL bytes and invalid UTF-8 in `bytes`, which start at byte `offset` of `path`.
/// `complete` says whether `bytes` ends at the end of the text; when it does not, a multi-byte
/// character cut off at the end is fine.
fn check_text_bytes(path: &Path, bytes: &[u8], offset: u64, complete: bool) -> Result<()> {
    if let Some(i) = bytes.iter().position(|&b| b == 0) {
        return Err(Error::data(
            path,
            format!("looks binary (NUL byte at byte {}), expected UTF-8 text", offset + i as u64),
        ));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        if complete || e.error_len().is_some() {
            return Err(Error::data(
                path,
                format!(
                    "not valid UTF-8 (bad byte at byte {}), expected UTF-8 text\nHINT: convert it first, e.g. `iconv -f latin1 -t utf-8`",
                    offset + e.valid_up_to() as u64
                ),
            ));
        }
    }
    Ok(())
}

/// A text file read as a sequence of chunks of roughly `target_bytes`, each cut at a safe
/// boundary (see the module docs), with UTF-8 and NUL checks on every byte.
pub struct TextChunks {
    path: PathBuf,
    reader: BufReader<File>,
    /// Tail of an over-long line, read but not yet handed out.
    carry: Vec<u8>,
    eof: bool,
    /// The next piece (a line, or a fragment of an over-long line), read ahead so a chunk can
    /// look at how it starts before deciding to end.
    peeked: Option<String>,
    /// The end of a line whose start went out in the previous chunk (cut by `last_space_cut`).
    leftover: String,
    /// Byte offset in the file where the next chunk starts.
    offset: u64,
    /// Byte offset of the end of what has been read from the file so far.
    read_offset: u64,
}

impl TextChunks {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(TextChunks {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 16, file),
            carry: Vec::new(),
            eof: false,
            peeked: None,
            leftover: String::new(),
            offset: 0,
            read_offset: 0,
        })
    }

    /// Byte offset where the next chunk will start.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next chunk of about `target_bytes` (at most 4× that, plus one line), made of the
    /// pieces that start before byte `stop`. `None` once the file, or the part before `stop`,
    /// is used up.
    pub fn next_chunk(&mut self, target_bytes: usize, stop: u64) -> Result<Option<String>> {
        // The rest of a line cut by the previous chunk comes first, whatever `stop` says: its
        // line started before `stop`.
        let mut buf = std::mem::take(&mut self.leftover);
        self.offset += buf.len() as u64;
        loop {
            if self.offset >= stop {
                break;
            }
            let Some(piece) = self.peek()? else { break };
            if buf.len() >= target_bytes && is_safe_cut(&buf, piece) {
                break;
            }
            if buf.len() >= 4 * target_bytes {
                if let Some(at) = last_space_cut(&buf) {
                    self.leftover = buf.split_off(at);
                    self.offset -= self.leftover.len() as u64;
                }
                break;
            }
            let piece = self.peeked.take().unwrap_or_default();
            self.offset += piece.len() as u64;
            if buf.is_empty() {
                buf = piece;
            } else {
                buf.push_str(&piece);
            }
        }
        Ok(if buf.is_empty() { None } else { Some(buf) })
    }

    /// The next piece (a line with its `\n`, or a fragment of an over-long line), for callers
    /// that want lines, like tokenizer training.
    pub fn next_piece(&mut self) -> Result<Option<String>> {
        if !self.leftover.is_empty() {
            let piece = std::mem::take(&mut self.leftover);
            self.offset += piece.len() as u64;
            return Ok(Some(piece));
        }
        self.peek()?;
        let piece = self.peeked.take();
        if let Some(p) = &piece {
            self.offset += p.len() as u64;
        }
        Ok(piece)
    }

    fn peek(&mut self) -> Result<Option<&str>> {
        if self.peeked.is_none() {
            self.peeked = self.read_piece()?;
        }
        Ok(self.peeked.as_deref())
    }

    fn read_piece(&mut self) -> Result<Option<String>> {
        let mut bytes = std::mem::take(&mut self.carry);
        if !self.eof {
            let want = (MAX_PIECE_BYTES - bytes.len()) as u64;
            let n =
                (&mut self.reader).take(want).read_until(b'\n', &mut bytes).map_err(|e| Error::io(&self.path, e))?;
            if n == 0 {
                self.eof = true;
            }
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        if !self.eof && bytes.len() >= MAX_PIECE_BYTES && bytes.last() != Some(&b'\n') {
            let cut = long_line_cut(&bytes);
            self.carry = bytes.split_off(cut);
        }
        let start = self.read_offset;
        self.read_offset += bytes.len() as u64;
        // A piece never ends inside a character (cuts are at ASCII bytes or char boundaries), so
        // it must be complete UTF-8 by itself.
        check_text_bytes(&self.path, &bytes, start, true)?;
        Ok(Some(String::from_utf8(bytes).unwrap_or_default()))
    }
}

/// Whether a chunk ending with `before` may end here when the text continues with `after`
/// (see the module docs).
fn is_safe_cut(before: &str, after: &str) -> bool {
    let mut back = before.chars().rev();
    let mut next = after.chars();
    let (Some(last), Some(first)) = (back.next(), next.next()) else { return true };
    let nonspace = |c: Option<char>| c.is_some_and(|c| !c.is_whitespace());
    if last == '\n' {
        return nonspace(back.next()) && !first.is_whitespace();
    }
    // Between pieces of an over-long line: "word| word".
    !last.is_whitespace() && first == ' ' && nonspace(next.next())
}

/// The last `X| Y` cut in `text` (a single space between non-space characters), as a byte
/// offset in `1..text.len()`.
fn last_space_cut(text: &str) -> Option<usize> {
    let mut chars = text.char_indices().rev().peekable();
    let mut after: Option<char> = None;
    while let Some((i, c)) = chars.next() {
        let before = chars.peek().map(|&(_, b)| b);
        if c == ' ' && i > 0 && after.is_some_and(|a| !a.is_whitespace()) && before.is_some_and(|b| !b.is_whitespace())
        {
            return Some(i);
        }
        after = Some(c);
    }
    None
}

/// Where to cut an over-long line held in `bytes`: before a `" x"` (a space then a non-space,
/// after a non-space) if there is one, else after any ASCII whitespace, else at a character
/// boundary. Always in `1..bytes.len()`.
fn long_line_cut(bytes: &[u8]) -> usize {
    let n = bytes.len();
    let nonspace = |b: u8| !b.is_ascii_whitespace();
    if let Some(i) = (1..n - 1).rev().find(|&i| bytes[i] == b' ' && nonspace(bytes[i - 1]) && nonspace(bytes[i + 1])) {
        return i;
    }
    if let Some(i) = (1..n).rev().find(|&i| bytes[i - 1].is_ascii_whitespace()) {
        return i;
    }
    // UTF-8 continuation bytes are 0b10xx_xxxx; a char boundary is any other byte.
    (1..n).rev().find(|&i| bytes[i] & 0xC0 != 0x80).unwrap_or(n)
}
