//! The incremental snapshot stream (`rackblock snapshot export --format
//! incremental`, read back by `rackblock snapshot apply`).
//!
//! A stream is a header, records in increasing offset order, and an end
//! record; every integer is little-endian:
//!
//! ```text
//! header (64 bytes):
//!   magic "RBINCR01" | version u32 (1) | block_size u32 (4096)
//!   volume_size_bytes u64 | base_snapshot u64 (0: none, a full stream)
//!   snapshot u64 | reserved [0; 20] | crc32c u32 of the 60 bytes before
//! record:
//!   kind u8 (1 Data, 2 Zero, 0xff End) | reserved [0; 3]
//!   offset_bytes u64 | len_bytes u64
//!   data: len_bytes bytes (Data only; at most 4 MiB a record)
//!   crc32c u32 of the record's header (20 bytes) and data
//! End: offset_bytes = number of Data and Zero records,
//!      len_bytes = the sum of their lengths
//! ```
//!
//! Applying a stream to an image of its base snapshot (or, for a full
//! stream, to any image of the volume's size) makes it the snapshot's
//! image: a Data record's bytes go to its offset, a Zero record's range
//! reads zeros. Offsets and lengths are multiples of the block size; the
//! records do not overlap. A reader checks every CRC and refuses a stream
//! without its End record (a cut-off stream is never mistaken for a whole
//! one).

use std::io::{Read, Write};

/// The stream's magic.
pub const MAGIC: &[u8; 8] = b"RBINCR01";
/// The format version written.
pub const VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_BYTES: usize = 64;
/// Most bytes of one Data record.
pub const MAX_RECORD_BYTES: u64 = 4 << 20;
/// The block size of every offset and length.
pub const BLOCK_BYTES: u64 = 4096;

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_END: u8 = 0xff;
const RECORD_HEADER_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("not an incremental snapshot stream: {0}")]
    Format(String),
    #[error("the stream's {what} CRC does not match (corrupted)")]
    Crc { what: String },
    #[error("the stream ends before its end record (cut off)")]
    Truncated,
}

/// The stream's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub volume_size_bytes: u64,
    /// The snapshot the stream applies on (0: none, a full stream).
    pub base_snapshot: u64,
    /// The snapshot the stream's result is.
    pub snapshot: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(BLOCK_BYTES as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.volume_size_bytes.to_le_bytes());
        out[24..32].copy_from_slice(&self.base_snapshot.to_le_bytes());
        out[32..40].copy_from_slice(&self.snapshot.to_le_bytes());
        let crc = crc32c::crc32c(&out[..60]);
        out[60..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Header, StreamError> {
        if &bytes[..8] != MAGIC {
            return Err(StreamError::Format("bad magic".into()));
        }
        if crc32c::crc32c(&bytes[..60]) != u32_at(bytes, 60) {
            return Err(StreamError::Crc {
                what: "header".into(),
            });
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(StreamError::Format(format!(
                "version {version}, not {VERSION}"
            )));
        }
        let block = u32_at(bytes, 12);
        if u64::from(block) != BLOCK_BYTES {
            return Err(StreamError::Format(format!("block size {block}")));
        }
        if bytes[40..60].iter().any(|b| *b != 0) {
            return Err(StreamError::Format("reserved header bytes set".into()));
        }
        let header = Header {
            volume_size_bytes: u64_at(bytes, 16),
            base_snapshot: u64_at(bytes, 24),
            snapshot: u64_at(bytes, 32),
        };
        if header.volume_size_bytes % BLOCK_BYTES != 0 {
            return Err(StreamError::Format(format!(
                "volume size {} is not a multiple of {BLOCK_BYTES}",
                header.volume_size_bytes
            )));
        }
        Ok(header)
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

fn record_header(kind: u8, offset_bytes: u64, len_bytes: u64) -> [u8; RECORD_HEADER_BYTES] {
    let mut out = [0u8; RECORD_HEADER_BYTES];
    out[0] = kind;
    out[4..12].copy_from_slice(&offset_bytes.to_le_bytes());
    out[12..20].copy_from_slice(&len_bytes.to_le_bytes());
    out
}

/// Writes a stream: the header first, then records in offset order.
pub struct StreamWriter<W: Write> {
    out: W,
    header: Header,
    /// End of the last record (records go in increasing offset order).
    at: u64,
    records: u64,
    bytes: u64,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(mut out: W, header: Header) -> Result<Self, StreamError> {
        out.write_all(&header.encode())?;
        Ok(StreamWriter {
            out,
            header,
            at: 0,
            records: 0,
            bytes: 0,
        })
    }

    fn check(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), StreamError> {
        let aligned = offset_bytes % BLOCK_BYTES == 0 && len_bytes % BLOCK_BYTES == 0;
        let end = offset_bytes.checked_add(len_bytes);
        if !aligned
            || len_bytes == 0
            || offset_bytes < self.at
            || end.is_none_or(|e| e > self.header.volume_size_bytes)
        {
            return Err(StreamError::Format(format!(
                "record {offset_bytes}+{len_bytes} is unaligned, empty, out of order or past the volume's end"
            )));
        }
        Ok(())
    }

    /// A Data record (split into records of at most [`MAX_RECORD_BYTES`]).
    pub fn data(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), StreamError> {
        self.check(offset_bytes, data.len() as u64)?;
        for (i, chunk) in data.chunks(MAX_RECORD_BYTES as usize).enumerate() {
            let at = offset_bytes + i as u64 * MAX_RECORD_BYTES;
            let head = record_header(KIND_DATA, at, chunk.len() as u64);
            let mut crc = crc32c::crc32c(&head);
            crc = crc32c::crc32c_append(crc, chunk);
            self.out.write_all(&head)?;
            self.out.write_all(chunk)?;
            self.out.write_all(&crc.to_le_bytes())?;
            self.records += 1;
        }
        self.at = offset_bytes + data.len() as u64;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// A Zero record.
    pub fn zero(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), StreamError> {
        self.check(offset_bytes, len_bytes)?;
        let head = record_header(KIND_ZERO, offset_bytes, len_bytes);
        self.out.write_all(&head)?;
        self.out.write_all(&crc32c::crc32c(&head).to_le_bytes())?;
        self.records += 1;
        self.at = offset_bytes + len_bytes;
        self.bytes += len_bytes;
        Ok(())
    }

    /// The End record; returns the output.
    pub fn finish(mut self) -> Result<W, StreamError> {
        let head = record_header(KIND_END, self.records, self.bytes);
        self.out.write_all(&head)?;
        self.out.write_all(&crc32c::crc32c(&head).to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Data { offset_bytes: u64, data: Vec<u8> },
    Zero { offset_bytes: u64, len_bytes: u64 },
}

/// Reads a stream, checking every CRC, the order and the End record.
pub struct StreamReader<R: Read> {
    input: R,
    pub header: Header,
    at: u64,
    records: u64,
    bytes: u64,
    ended: bool,
}

fn read_exact_or_truncated<R: Read>(input: &mut R, buf: &mut [u8]) -> Result<(), StreamError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => StreamError::Truncated,
        _ => StreamError::Io(e),
    })
}

impl<R: Read> StreamReader<R> {
    pub fn new(mut input: R) -> Result<Self, StreamError> {
        let mut head = [0u8; HEADER_BYTES];
        read_exact_or_truncated(&mut input, &mut head)?;
        Ok(StreamReader {
            input,
            header: Header::decode(&head)?,
            at: 0,
            records: 0,
            bytes: 0,
            ended: false,
        })
    }

    /// The next record; `None` after the End record (which must match the
    /// records read).
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        if self.ended {
            return Ok(None);
        }
        let mut head = [0u8; RECORD_HEADER_BYTES];
        read_exact_or_truncated(&mut self.input, &mut head)?;
        let (kind, offset_bytes, len_bytes) = (head[0], u64_at(&head, 4), u64_at(&head, 12));
        if head[1..4].iter().any(|b| *b != 0) {
            return Err(StreamError::Format("reserved record bytes set".into()));
        }
        let mut data = Vec::new();
        if kind == KIND_DATA {
            if len_bytes > MAX_RECORD_BYTES {
                return Err(StreamError::Format(format!(
                    "data record of {len_bytes} bytes (most {MAX_RECORD_BYTES})"
                )));
            }
            data = vec![0u8; len_bytes as usize];
            read_exact_or_truncated(&mut self.input, &mut data)?;
        }
        let mut crc = [0u8; 4];
        read_exact_or_truncated(&mut self.input, &mut crc)?;
        let want = crc32c::crc32c_append(crc32c::crc32c(&head), &data);
        if u32::from_le_bytes(crc) != want {
            return Err(StreamError::Crc {
                what: format!("record at {offset_bytes}"),
            });
        }
        if kind == KIND_END {
            if offset_bytes != self.records || len_bytes != self.bytes {
                return Err(StreamError::Format(format!(
                    "end record counts {offset_bytes} records of {len_bytes} bytes, read {} of {}",
                    self.records, self.bytes
                )));
            }
            self.ended = true;
            return Ok(None);
        }
        let aligned = offset_bytes % BLOCK_BYTES == 0 && len_bytes % BLOCK_BYTES == 0;
        let end = offset_bytes.checked_add(len_bytes);
        if !aligned
            || len_bytes == 0
            || offset_bytes < self.at
            || end.is_none_or(|e| e > self.header.volume_size_bytes)
        {
            return Err(StreamError::Format(format!(
                "record {offset_bytes}+{len_bytes} is unaligned, empty, out of order or past the volume's end"
            )));
        }
        self.at = offset_bytes + len_bytes;
        self.records += 1;
        self.bytes += len_bytes;
        match kind {
            KIND_DATA => Ok(Some(Record::Data { offset_bytes, data })),
            KIND_ZERO => Ok(Some(Record::Zero {
                offset_bytes,
                len_bytes,
            })),
            other => Err(StreamError::Format(format!("record kind {other}"))),
        }
    }
}

/// Applies a stream onto `target` (an image of the stream's base, or of
/// the volume for a full stream; it must be the volume's size): returns
/// the header and the bytes of the records applied. Nothing is applied
/// past a record that fails its check, and a stream cut off before its
/// End record is an error (the target then holds a partial application).
pub fn apply<R: Read>(input: R, target: &std::fs::File) -> Result<(Header, u64), StreamError> {
    use std::os::unix::fs::FileExt;
    let mut reader = StreamReader::new(input)?;
    let size = target.metadata()?.len();
    if size != reader.header.volume_size_bytes {
        return Err(StreamError::Format(format!(
            "the target is {size} bytes, the stream's volume {}",
            reader.header.volume_size_bytes
        )));
    }
    let zeros = vec![0u8; MAX_RECORD_BYTES as usize];
    let mut applied = 0;
    while let Some(record) = reader.next_record()? {
        match record {
            Record::Data { offset_bytes, data } => {
                target.write_all_at(&data, offset_bytes)?;
                applied += data.len() as u64;
            }
            Record::Zero {
                offset_bytes,
                len_bytes,
            } => {
                let mut at = offset_bytes;
                while at < offset_bytes + len_bytes {
                    let n = (offset_bytes + len_bytes - at).min(MAX_RECORD_BYTES);
                    target.write_all_at(&zeros[..n as usize], at)?;
                    at += n;
                }
                applied += len_bytes;
            }
        }
    }
    target.sync_all()?;
    Ok((reader.header, applied))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SIZE: u64 = 64 * BLOCK_BYTES;

    fn header() -> Header {
        Header {
            volume_size_bytes: SIZE,
            base_snapshot: 3,
            snapshot: 5,
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), header()).unwrap();
        w.data(0, &[7u8; 8192]).unwrap();
        w.zero(8192, 4096).unwrap();
        w.data(20 * BLOCK_BYTES, &[9u8; 4096]).unwrap();
        w.finish().unwrap()
    }

    /// A stream reads back as written and applies onto an image: the data
    /// and zero records land, the rest of the image is untouched.
    #[test]
    fn stream_round_trips_and_applies() {
        let bytes = sample();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        assert_eq!(r.header, header());
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::Data {
                offset_bytes: 0,
                data: vec![7u8; 8192]
            })
        );
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::Zero {
                offset_bytes: 8192,
                len_bytes: 4096
            })
        );
        assert!(matches!(
            r.next_record().unwrap(),
            Some(Record::Data { .. })
        ));
        assert_eq!(r.next_record().unwrap(), None);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, vec![1u8; SIZE as usize]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let (_, applied) = apply(&bytes[..], &file).unwrap();
        assert_eq!(applied, 8192 + 4096 + 4096);
        let image = std::fs::read(&path).unwrap();
        let mut want = vec![1u8; SIZE as usize];
        want[..8192].fill(7);
        want[8192..12288].fill(0);
        want[20 * 4096..21 * 4096].fill(9);
        assert_eq!(image, want);
    }

    /// Every single-byte corruption and every truncation is refused.
    #[test]
    fn corruption_and_truncation_are_refused() {
        let bytes = sample();
        let read_all = |b: &[u8]| -> Result<(), StreamError> {
            let mut r = StreamReader::new(b)?;
            while r.next_record()?.is_some() {}
            Ok(())
        };
        read_all(&bytes).unwrap();
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x5a;
            assert!(read_all(&bad).is_err(), "corruption at {at} accepted");
        }
        for len in 0..bytes.len() {
            assert!(read_all(&bytes[..len]).is_err(), "cut at {len} accepted");
        }
    }

    /// The writer refuses records out of order, unaligned or past the end;
    /// a large data record is split.
    #[test]
    fn writer_checks_records_and_splits_large_ones() {
        let mut w = StreamWriter::new(
            Vec::new(),
            Header {
                volume_size_bytes: 3 * MAX_RECORD_BYTES,
                ..header()
            },
        )
        .unwrap();
        w.data(
            BLOCK_BYTES,
            &vec![3u8; (MAX_RECORD_BYTES + BLOCK_BYTES) as usize],
        )
        .unwrap();
        assert!(w.data(0, &[0u8; 4096]).is_err());
        assert!(w.zero(2 * MAX_RECORD_BYTES + 1, 4096).is_err());
        assert!(w.zero(3 * MAX_RECORD_BYTES, 4096).is_err());
        let bytes = w.finish().unwrap();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        let mut records = 0;
        while let Some(record) = r.next_record().unwrap() {
            records += 1;
            if let Record::Data { data, .. } = record {
                assert!(data.len() as u64 <= MAX_RECORD_BYTES);
            }
        }
        assert_eq!(records, 2);
    }
}
