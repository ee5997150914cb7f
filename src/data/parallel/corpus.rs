//! Reading a parallel corpus: a TSV whose first line names the columns, one aligned pair per
//! line after it, plain or gzip-compressed.
//!
//! ```text
//! book     chapter  verse  kjv                                 web                               rv1909
//! Genesis  1        1      In the beginning God created the…   In the beginning, God created…   EN el principio crió Dios…
//! ```
//!
//! Columns are found by name, so the same file serves KJV → Spanish and KJV → modern English.
//! A row is read as bytes and checked for UTF-8 on its own, so every error can name its line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;

use crate::error::{Error, Result};

/// The column naming the document a row belongs to; splits hold out whole documents.
pub const BOOK_COLUMN: &str = "book";

/// gzip's magic number (RFC 1952): a compressed file is recognised by its content.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// One aligned pair of texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPair {
    /// Index into [`ParallelCorpus::books`].
    pub book: usize,
    /// 1-based line of the file (the header is line 1), for messages.
    pub line: usize,
    pub source: String,
    pub target: String,
}

/// The pairs of one source and one target column of a TSV file.
#[derive(Debug, Clone)]
pub struct ParallelCorpus {
    pub path: PathBuf,
    pub source_column: String,
    pub target_column: String,
    /// Distinct values of the `book` column, in order of first appearance.
    pub books: Vec<String>,
    /// Every row, in file order.
    pub pairs: Vec<TextPair>,
}

impl ParallelCorpus {
    /// Read the `source` and `target` columns of `path` (and its `book` column). Errors name the
    /// file, the line and the column: a missing or duplicate column, a row with another number
    /// of fields than the header, an empty text, bad UTF-8, an empty file.
    pub fn read(path: &Path, source: &str, target: &str) -> Result<Self> {
        let mut lines = Lines::open(path)?;
        let Some((_, header_line)) = lines.next_line()? else {
            return Err(Error::data(
                path,
                "file is empty, expected a header line naming the columns (e.g. `book\tchapter\tverse\tkjv\tweb\trv1909`) and one pair per line after it",
            ));
        };
        let header = Header::parse(path, header_line.trim_start_matches('\u{feff}'))?;
        let [book_at, source_at, target_at] = [BOOK_COLUMN, source, target].map(|name| header.find(path, name));
        let (book_at, source_at, target_at) = (book_at?, source_at?, target_at?);

        let mut corpus = ParallelCorpus {
            path: path.to_path_buf(),
            source_column: source.to_string(),
            target_column: target.to_string(),
            books: Vec::new(),
            pairs: Vec::new(),
        };
        while let Some((line, text)) = lines.next_line()? {
            if text.is_empty() {
                continue; // a blank line (e.g. at the end of the file) holds no pair
            }
            let fields: Vec<&str> = text.split('\t').collect();
            if fields.len() != header.names.len() {
                return Err(Error::data(
                    path,
                    format!(
                        "line {line} has {} tab-separated fields, but the header has {} ({})\nHINT: every row needs one value per column, and a text must not contain a tab",
                        fields.len(),
                        header.names.len(),
                        header.names.join(", ")
                    ),
                ));
            }
            for (name, at) in [(BOOK_COLUMN, book_at), (source, source_at), (target, target_at)] {
                if fields[at].trim().is_empty() {
                    return Err(Error::data(
                        path,
                        format!("line {line}: the `{name}` column (column {}) is empty\nHINT: a pair needs text on both sides and a book; fill the field or remove the row", at + 1),
                    ));
                }
            }
            let book = corpus.book_index(fields[book_at]);
            corpus.pairs.push(TextPair {
                book,
                line,
                source: fields[source_at].to_string(),
                target: fields[target_at].to_string(),
            });
        }
        if corpus.pairs.is_empty() {
            return Err(Error::data(path, "has a header but no rows, expected one aligned pair per line after it"));
        }
        Ok(corpus)
    }

    /// The book of `pair`.
    pub fn book_name(&self, pair: &TextPair) -> &str {
        &self.books[pair.book]
    }

    /// The index of book `name` in [`books`](Self::books), or an error listing them; `flag`
    /// names the option the name came from (`--books`).
    pub fn find_book(&self, name: &str, flag: &str) -> Result<usize> {
        if let Some(at) = self.books.iter().position(|b| b == name) {
            return Ok(at);
        }
        let hint = match self.books.iter().find(|b| b.eq_ignore_ascii_case(name)) {
            Some(b) => format!("did you mean `{b}`? Book names match exactly"),
            None => format!("{flag} names values of the `book` column; this file has: {}", self.books.join(", ")),
        };
        Err(Error::data(&self.path, format!("no book `{name}` (given by {flag})\nHINT: {hint}")))
    }

    fn book_index(&mut self, name: &str) -> usize {
        // Rows of a book are contiguous in practice, so the last book is almost always the hit.
        match self.books.iter().rposition(|b| b == name) {
            Some(i) => i,
            None => {
                self.books.push(name.to_string());
                self.books.len() - 1
            }
        }
    }
}

/// The header line's column names.
struct Header {
    names: Vec<String>,
}

impl Header {
    fn parse(path: &Path, line: &str) -> Result<Self> {
        let names: Vec<String> = line.split('\t').map(String::from).collect();
        for (i, name) in names.iter().enumerate() {
            if name.trim().is_empty() {
                return Err(Error::data(
                    path,
                    format!("line 1 (the header): column {} has no name\nHINT: the first line must name every column, separated by tabs", i + 1),
                ));
            }
            if let Some(first) = names[..i].iter().position(|n| n == name) {
                return Err(Error::data(
                    path,
                    format!("line 1 (the header): column `{name}` appears twice (columns {} and {})", first + 1, i + 1),
                ));
            }
        }
        Ok(Header { names })
    }

    fn find(&self, path: &Path, name: &str) -> Result<usize> {
        if let Some(at) = self.names.iter().position(|n| n == name) {
            return Ok(at);
        }
        // A first line of data instead of a header: its "names" are texts and numbers.
        let looks_like_data = self.names.iter().any(|n| n.contains(' ') || n.parse::<f64>().is_ok());
        let hint = if looks_like_data {
            "HINT: line 1 looks like data; the first line must be a header naming the columns".to_string()
        } else if name == BOOK_COLUMN {
            "HINT: add a `book` column naming the document each row belongs to; test and validation hold out whole books".to_string()
        } else {
            "HINT: --source and --target name columns of the header line".to_string()
        };
        Err(Error::data(
            path,
            format!("no column `{name}` in the header; its columns are: {}\n{hint}", self.names.join(", ")),
        ))
    }
}

/// The lines of a plain or gzip-compressed file, without their line ends, numbered from 1.
struct Lines {
    path: PathBuf,
    reader: Box<dyn BufRead>,
    /// Number of the line last returned.
    number: usize,
    buffer: Vec<u8>,
}

impl Lines {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        if file.metadata().map_err(|e| Error::io(path, e))?.is_dir() {
            return Err(Error::data(path, "is a directory, expected a TSV file (plain or .gz)"));
        }
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let head = reader.fill_buf().map_err(|e| Error::io(path, e))?;
        let reader: Box<dyn BufRead> = if head.starts_with(&GZIP_MAGIC) {
            Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(reader)))
        } else {
            Box::new(reader)
        };
        Ok(Lines { path: path.to_path_buf(), reader, number: 0, buffer: Vec::new() })
    }

    /// The next line and its number.
    fn next_line(&mut self) -> Result<Option<(usize, &str)>> {
        self.buffer.clear();
        let line = self.number + 1;
        let n = self.reader.read_until(b'\n', &mut self.buffer).map_err(|e| {
            Error::data(&self.path, format!("cannot read line {line}: {e} (a damaged or truncated gzip file?)"))
        })?;
        if n == 0 {
            return Ok(None);
        }
        self.number = line;
        let mut bytes = self.buffer.as_slice();
        bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        std::str::from_utf8(bytes).map(|text| Some((line, text))).map_err(|e| {
            Error::data(
                &self.path,
                format!(
                    "line {line} is not valid UTF-8 (bad byte at byte {} of the line)\nHINT: convert the file first, e.g. `iconv -f latin1 -t utf-8`",
                    e.valid_up_to() + 1
                ),
            )
        })
    }
}
