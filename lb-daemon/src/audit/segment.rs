//! Segment files: a fixed header, then framed records.
//!
//! ```text
//! header (128 bytes, integers little-endian)
//!   0  magic        "LBAUDIT\0"
//!   8  version      u16 = 1
//!  10  header_len   u16 = 128
//!  12  incompat     u32   feature flags a reader must understand (refuses unknown bits)
//!  16  compat       u32   feature flags a reader may ignore
//!  20  reserved     u32
//!  24  index        u64   segment number, from 1
//!  32  first_seq    u64   seq of the first record in this segment
//!  40  created_ns   i64   Unix ns when the segment was created
//!  48  host_id      16 bytes (/etc/machine-id, or zero)
//!  64  boot_id      16 bytes (/proc/sys/kernel/random/boot_id, or zero)
//!  80  prev_head    32 bytes (hash-chain head at the end of the previous segment; zero for
//!                  the first)
//! 112  reserved     12 bytes
//! 124  header_crc   u32   CRC32C of bytes 0..124
//! frame
//!   0  len   u32   bytes of type + payload
//!   4  crc   u32   CRC32C of type + payload
//!   8  type  u8    1 = record
//!   9  payload     bincode 2 (standard config) encoding of `Record`
//! ```

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};

use super::record::Record;

pub const MAGIC: &[u8; 8] = b"LBAUDIT\0";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 128;
/// Incompatible-feature bits this reader understands.
pub const KNOWN_INCOMPAT: u32 = 0;
pub const FRAME_RECORD: u8 = 1;
/// Largest frame accepted: a record is a few hundred bytes; anything this large is corruption.
pub const MAX_FRAME: u32 = 1 << 20;
pub const SUFFIX: &str = "lbaudit";

/// A segment's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub incompat: u32,
    pub compat: u32,
    pub index: u64,
    pub first_seq: u64,
    pub created_ns: i64,
    pub host_id: [u8; 16],
    pub boot_id: [u8; 16],
    pub prev_head: [u8; 32],
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        b[12..16].copy_from_slice(&self.incompat.to_le_bytes());
        b[16..20].copy_from_slice(&self.compat.to_le_bytes());
        b[24..32].copy_from_slice(&self.index.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.created_ns.to_le_bytes());
        b[48..64].copy_from_slice(&self.host_id);
        b[64..80].copy_from_slice(&self.boot_id);
        b[80..112].copy_from_slice(&self.prev_head);
        let crc = crc32c::crc32c(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> anyhow::Result<Header> {
        if b.len() < HEADER_LEN {
            bail!("segment shorter than its header ({} bytes)", b.len());
        }
        if &b[0..8] != MAGIC {
            bail!("not an lb audit segment (bad magic)");
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if crc32c::crc32c(&b[..124]) != u32_at(124) {
            bail!("segment header checksum mismatch");
        }
        let version = u16_at(8);
        if version != VERSION || u16_at(10) as usize != HEADER_LEN {
            bail!("unsupported segment format version {version}");
        }
        let incompat = u32_at(12);
        if incompat & !KNOWN_INCOMPAT != 0 {
            bail!("segment uses incompatible features {incompat:#x} this reader does not know");
        }
        Ok(Header {
            incompat,
            compat: u32_at(16),
            index: u64_at(24),
            first_seq: u64_at(32),
            created_ns: u64_at(40) as i64,
            host_id: b[48..64].try_into().expect("16 bytes"),
            boot_id: b[64..80].try_into().expect("16 bytes"),
            prev_head: b[80..112].try_into().expect("32 bytes"),
        })
    }
}

/// The encoding of every payload.
pub fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// One frame's bytes for a record.
pub fn encode_frame(rec: &Record) -> anyhow::Result<Vec<u8>> {
    let mut frame = Vec::new();
    encode_frame_into(rec, &mut frame)?;
    Ok(frame)
}

/// `encode_frame` into a buffer the caller reuses (cleared first): one pass, no allocation
/// once the buffer has grown to the size of a record.
pub fn encode_frame_into(rec: &Record, frame: &mut Vec<u8>) -> anyhow::Result<()> {
    frame.clear();
    frame.extend_from_slice(&[0u8; 8]);
    frame.push(FRAME_RECORD);
    bincode::serde::encode_into_std_write(rec, frame, bincode_config())
        .context("encoding a record")?;
    let body_len = frame.len() - 8;
    if body_len > MAX_FRAME as usize {
        bail!("a record of {body_len} bytes is larger than a frame may be");
    }
    let crc = crc32c::crc32c(&frame[8..]);
    frame[0..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The segment files of a log directory, by index.
pub fn list(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(&format!(".{SUFFIX}")) else {
            continue;
        };
        if let Ok(index) = stem.parse::<u64>() {
            out.push((index, path));
        }
    }
    out.sort();
    Ok(out)
}

pub fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:08}.{SUFFIX}"))
}

/// What reading a frame found.
pub enum Frame {
    Record(Record),
    /// Clean end of the segment.
    End,
    /// Bytes that do not form a whole, valid frame: a torn write at the tail, or corruption.
    Bad {
        offset: u64,
        why: String,
    },
}

/// What reading a frame without decoding it found.
pub enum Raw {
    /// A whole frame of type record with a good checksum, in `last_frame` (its payload in
    /// `payload()`), not yet decoded.
    Record,
    End,
    Bad {
        offset: u64,
        why: String,
    },
}

/// Reads the records of one segment in order, with bounded memory.
pub struct SegmentReader {
    pub header: Header,
    input: BufReader<File>,
    pub offset: u64,
    pub len: u64,
    /// Where the frame `next_frame` or `next_raw` last read starts.
    pub frame_offset: u64,
    /// The bytes of the frame last read (length, CRC, type, payload), as the hash chain takes
    /// them: the frame is read into this buffer, which is reused from frame to frame.
    pub last_frame: Vec<u8>,
    /// No longer has an effect (the frame is always read in place into `last_frame`).
    pub keep_frames: bool,
}

impl SegmentReader {
    pub fn open(path: &Path) -> anyhow::Result<SegmentReader> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut head = [0u8; HEADER_LEN];
        file.read_exact(&mut head)
            .map_err(|_| anyhow!("{}: shorter than a segment header", path.display()))?;
        let header = Header::decode(&head).with_context(|| path.display().to_string())?;
        Ok(SegmentReader {
            header,
            input: BufReader::with_capacity(1 << 16, file),
            offset: HEADER_LEN as u64,
            len,
            frame_offset: HEADER_LEN as u64,
            last_frame: Vec::new(),
            keep_frames: true,
        })
    }

    /// Opens a segment and positions it at `offset` (a frame boundary found earlier).
    pub fn open_at(path: &Path, offset: u64) -> anyhow::Result<SegmentReader> {
        let mut r = SegmentReader::open(path)?;
        if offset > HEADER_LEN as u64 {
            r.input.seek(SeekFrom::Start(offset))?;
            r.offset = offset;
        }
        Ok(r)
    }

    /// The payload of the frame `next_raw` last returned as `Raw::Record`.
    pub fn payload(&self) -> &[u8] {
        self.last_frame.get(9..).unwrap_or_default()
    }

    /// Reads the next frame and checks its length, checksum and type, without decoding it.
    pub fn next_raw(&mut self) -> io::Result<Raw> {
        let start = self.offset;
        self.frame_offset = start;
        if start == self.len {
            return Ok(Raw::End);
        }
        let bad = |why: &str| {
            Ok(Raw::Bad {
                offset: start,
                why: why.to_string(),
            })
        };
        if self.len - start < 8 {
            return bad("truncated frame header");
        }
        let mut fh = [0u8; 8];
        self.input.read_exact(&mut fh)?;
        let len = u32::from_le_bytes(fh[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(fh[4..8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_FRAME {
            return bad("impossible frame length");
        }
        if self.len - start - 8 < len as u64 {
            return bad("truncated frame");
        }
        let frame = &mut self.last_frame;
        frame.resize(8 + len as usize, 0);
        frame[..8].copy_from_slice(&fh);
        self.input.read_exact(&mut frame[8..])?;
        self.offset = start + 8 + len as u64;
        let body = &frame[8..];
        if crc32c::crc32c(body) != crc {
            return bad("frame checksum mismatch");
        }
        if body[0] != FRAME_RECORD {
            return bad("unknown frame type");
        }
        Ok(Raw::Record)
    }

    /// Reads and decodes the next frame.
    pub fn next_frame(&mut self) -> io::Result<Frame> {
        Ok(match self.next_raw()? {
            Raw::Record => match decode_payload(self.payload()) {
                Ok(rec) => Frame::Record(rec),
                Err(why) => Frame::Bad {
                    offset: self.frame_offset,
                    why,
                },
            },
            Raw::End => Frame::End,
            Raw::Bad { offset, why } => Frame::Bad { offset, why },
        })
    }
}

/// Decodes a record payload, which must use every byte; the error says why not. Lengths
/// inside the payload are bounded by the largest frame before anything is allocated for them
/// (a string claiming a terabyte is an error, not an attempt to allocate it).
pub fn decode_payload(payload: &[u8]) -> Result<Record, String> {
    let config = bincode_config().with_limit::<{ MAX_FRAME as usize }>();
    match bincode::serde::decode_from_slice::<Record, _>(payload, config) {
        Ok((rec, used)) if used == payload.len() => Ok(rec),
        Ok(_) => Err("trailing bytes after the record".into()),
        Err(e) => Err(format!("undecodable record: {e}")),
    }
}

/// Appends frames to one segment.
pub struct SegmentWriter {
    pub path: PathBuf,
    out: BufWriter<File>,
    pub len: u64,
    /// `len` at the last fdatasync.
    synced_len: u64,
}

impl SegmentWriter {
    pub fn create(dir: &Path, header: &Header) -> anyhow::Result<SegmentWriter> {
        let path = segment_path(dir, header.index);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(&header.encode())?;
        file.sync_all()?;
        // The new file's directory entry must be durable too.
        File::open(dir)?.sync_all()?;
        Ok(SegmentWriter {
            path,
            out: BufWriter::with_capacity(1 << 16, file),
            len: HEADER_LEN as u64,
            synced_len: HEADER_LEN as u64,
        })
    }

    /// Reopens a segment for appending after `valid_len` bytes; anything beyond is cut off.
    pub fn reopen(path: &Path, valid_len: u64) -> anyhow::Result<SegmentWriter> {
        let mut file = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.set_len(valid_len)?;
        file.seek(SeekFrom::Start(valid_len))?;
        file.sync_all()?;
        Ok(SegmentWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 16, file),
            len: valid_len,
            synced_len: valid_len,
        })
    }

    pub fn write(&mut self, frame: &[u8]) -> io::Result<()> {
        self.out.write_all(frame)?;
        self.len += frame.len() as u64;
        Ok(())
    }

    /// Hands buffered frames to the kernel (no fsync).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Writes buffered frames and makes them durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        self.synced_len = self.len;
        Ok(())
    }

    /// Whether frames were written since the last `sync`.
    pub fn unsynced(&self) -> bool {
        self.len > self.synced_len
    }
}

/// Reads a 16-byte identifier from a file of hex text (machine-id, boot_id); zero if absent.
pub fn read_id(path: &str) -> [u8; 16] {
    let text = fs::read_to_string(path).unwrap_or_default();
    let hex: String = text
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(32)
        .collect();
    let mut id = [0u8; 16];
    if hex.len() == 32 {
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
    }
    id
}

/// The hash chain: each frame's bytes (length, CRC, type, payload) extend the head.
pub fn chain(head: &[u8; 32], frame: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(head);
    h.update(frame);
    h.finalize().into()
}
