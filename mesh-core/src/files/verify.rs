//! BLAKE3 verified streaming over files on disk (bao-tree, 16 KiB chunk
//! groups). Everything here is blocking file I/O: the runtime calls it
//! from blocking threads, never from async ones.
//!
//! - [`hash_file`]: a file's root hash and its outboard (the hash pairs of
//!   its tree, about 0.4 % of its size), reading it once, in pieces.
//! - [`serve`]: the verified encoding of some groups of a local file (the
//!   hash pairs a receiver needs, interleaved with the groups' bytes),
//!   read from the file where it is (no copy) and re-checked against the
//!   outboard as it goes, so a file that changed since it was hashed
//!   fails ([`ServeError::SourceChanged`]) instead of sending bad data.
//! - [`Receiving`]: a partial file and its outboard; [`Receiving::take`]
//!   checks each group of an answer against the root hash before writing
//!   it at its offset, and stops at the first bad one
//!   ([`ReceiveError::Mismatch`]); [`Receiving::recover`] finds, after a
//!   crash, which groups on disk verify.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::{CreateOutboard, DecodeResponseIter, OutboardMut, WriteAt};
use bao_tree::io::{BaoContentItem, DecodeError, EncodeError, Leaf, Parent};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges, blake3};

use super::groups::GroupSet;
use super::wire::{FileHash, GROUP_LEN, groups_of};

/// 16 KiB chunk groups (2^4 chunks of 1 KiB).
pub const BLOCK: BlockSize = BlockSize::from_chunk_log(4);
/// Chunks (1 KiB) per group.
const CHUNKS_PER_GROUP: u64 = GROUP_LEN / 1024;

/// The root hash of the empty file.
pub fn empty_hash() -> FileHash {
    FileHash(*blake3::hash(&[]).as_bytes())
}

fn tree(size: u64) -> BaoTree {
    BaoTree::new(size, BLOCK)
}

fn chunk_ranges(groups: &[(u64, u64)]) -> ChunkRanges {
    let mut r = ChunkRanges::empty();
    for &(s, e) in groups {
        r |= ChunkRanges::from(
            ChunkNum(s.saturating_mul(CHUNKS_PER_GROUP))
                ..ChunkNum(e.saturating_mul(CHUNKS_PER_GROUP)),
        );
    }
    r
}

fn group_of_chunk(c: ChunkNum) -> u64 {
    c.0 / CHUNKS_PER_GROUP
}

/// Reads `data` once and writes its outboard to `outboard` (created or
/// replaced, then synced); returns the root hash and the size read.
pub fn hash_file(data: &Path, outboard: &Path) -> io::Result<(FileHash, u64)> {
    let file = File::open(data)?;
    let size = file.metadata()?.len();
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(outboard)?;
    let mut ob = PreOrderOutboard {
        root: blake3::Hash::from([0; 32]),
        tree: tree(size),
        data: out,
    };
    ob.init_from(BufReader::with_capacity(1 << 20, file.take(size)))?;
    ob.data.sync_all()?;
    Ok((FileHash(*ob.root.as_bytes()), size))
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The local file no longer matches its hash (changed or truncated
    /// since it was offered).
    #[error("the file changed since it was offered: {0}")]
    SourceChanged(String),
    /// Writing the answer failed (the peer went away).
    #[error("the answer could not be written: {0}")]
    Write(io::Error),
    /// Reading the file or its outboard failed.
    #[error("reading the file failed: {0}")]
    Read(io::Error),
}

/// Writes the verified encoding of `groups` of the file `data` (root
/// `hash`, `size` bytes, outboard in `outboard`) to `out`. If `checked`,
/// every group read is hashed again and checked against the outboard (a
/// file changed since it was hashed fails here); otherwise the receiver's
/// check is the only one (the caller compares the file's size and
/// modification time instead, which costs no hashing).
pub fn serve(
    data: &File,
    outboard: File,
    hash: FileHash,
    size: u64,
    groups: &[(u64, u64)],
    out: impl Write,
    checked: bool,
) -> Result<(), ServeError> {
    let ob = PreOrderOutboard {
        root: blake3::Hash::from(hash.0),
        tree: tree(size),
        data: outboard,
    };
    let ranges = chunk_ranges(groups);
    let encoded = if checked {
        bao_tree::io::sync::encode_ranges_validated(data, &ob, &ranges, out)
    } else {
        bao_tree::io::sync::encode_ranges(data, &ob, &ranges, out)
    };
    encoded.map_err(|e| match e {
        EncodeError::ParentHashMismatch(_) | EncodeError::LeafHashMismatch(_) => {
            ServeError::SourceChanged(e.to_string())
        }
        EncodeError::SizeMismatch => ServeError::SourceChanged("its size changed".into()),
        EncodeError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            ServeError::SourceChanged("it is shorter than it was".into())
        }
        EncodeError::ParentWrite(_) | EncodeError::LeafWrite(_) => {
            ServeError::Write(io::Error::other(e.to_string()))
        }
        EncodeError::Io(io) => ServeError::Write(io),
    })
}

/// Why taking an answer stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The sender sent data that does not match the root hash, at or
    /// after group `group` (which must be asked for again, elsewhere if
    /// possible).
    #[error("group {group} does not match the file's hash")]
    Mismatch {
        /// The first group that failed.
        group: u64,
    },
    /// The answer ended early or its stream failed (the connection
    /// dropped): ask again for what is missing.
    #[error("the answer stopped early: {0}")]
    Stream(String),
    /// Writing to the local disk failed.
    #[error("writing the file failed: {0}")]
    Disk(io::Error),
    /// The caller asked to stop.
    #[error("stopped")]
    Stopped,
}

/// Makes a [`Receiving`]'s files durable from elsewhere.
#[derive(Debug)]
pub struct Syncer {
    data: File,
    outboard: File,
}

impl Syncer {
    /// Data, then outboard, to disk.
    pub fn sync(&self) -> io::Result<()> {
        self.data.sync_data()?;
        self.outboard.sync_data()
    }
}

/// A file being received: its partial data and outboard on disk.
#[derive(Debug)]
pub struct Receiving {
    hash: FileHash,
    size: u64,
    data: File,
    outboard: PreOrderOutboard<File>,
}

impl Receiving {
    /// Opens (or creates) the partial file `data` and its outboard
    /// `outboard` for a file of root `hash` and `size` bytes.
    pub fn open(data: &Path, outboard: &Path, hash: FileHash, size: u64) -> io::Result<Self> {
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        };
        let data = open(data)?;
        let out = open(outboard)?;
        Ok(Receiving {
            hash,
            size,
            data,
            outboard: PreOrderOutboard {
                root: blake3::Hash::from(hash.0),
                tree: tree(size),
                data: out,
            },
        })
    }

    /// Takes the answer to a request for `groups` from `input`: every
    /// group is checked against the root hash before it is written at its
    /// offset; `verified(group)` is told of each (and returns `false` to
    /// stop). Stops at the first group that does not verify.
    pub fn take(
        &mut self,
        groups: &[(u64, u64)],
        input: impl Read,
        mut verified: impl FnMut(u64, u64) -> bool,
    ) -> Result<(), ReceiveError> {
        let ranges = chunk_ranges(groups);
        let root = blake3::Hash::from(self.hash.0);
        let items = DecodeResponseIter::new(root, tree(self.size), input, &ranges);
        for item in items {
            match item {
                Ok(BaoContentItem::Parent(Parent { node, pair })) => {
                    self.outboard
                        .save(node, &pair)
                        .map_err(ReceiveError::Disk)?;
                }
                Ok(BaoContentItem::Leaf(Leaf { offset, data })) => {
                    self.data
                        .write_all_at(offset, &data)
                        .map_err(ReceiveError::Disk)?;
                    if !verified(offset / GROUP_LEN, data.len() as u64) {
                        return Err(ReceiveError::Stopped);
                    }
                }
                Err(DecodeError::LeafHashMismatch(c)) => {
                    return Err(ReceiveError::Mismatch {
                        group: group_of_chunk(c),
                    });
                }
                Err(DecodeError::ParentHashMismatch(n)) => {
                    return Err(ReceiveError::Mismatch {
                        group: group_of_chunk(n.chunk_range().start),
                    });
                }
                Err(e @ (DecodeError::LeafNotFound(_) | DecodeError::ParentNotFound(_))) => {
                    return Err(ReceiveError::Stream(e.to_string()));
                }
                Err(DecodeError::Io(e)) => return Err(ReceiveError::Stream(e.to_string())),
            }
        }
        Ok(())
    }

    /// Makes what was written durable (data, then outboard).
    pub fn sync(&self) -> io::Result<()> {
        self.data.sync_data()?;
        self.outboard.data.sync_data()
    }

    /// A second handle to the files, to make them durable while
    /// [`Receiving::take`] runs.
    pub fn syncer(&self) -> io::Result<Syncer> {
        Ok(Syncer {
            data: self.data.try_clone()?,
            outboard: self.outboard.data.try_clone()?,
        })
    }

    /// The groups of the partial file that verify against the root hash,
    /// among those not in `known` (which are taken as verified): after a
    /// crash, what was written since the last saved state is found again
    /// instead of fetched again. Reads and hashes those groups.
    pub fn recover(&self, known: &GroupSet) -> io::Result<GroupSet> {
        let total = groups_of(self.size);
        let unknown = known.missing(total, usize::MAX);
        let mut found = known.clone();
        if unknown.is_empty() {
            return Ok(found);
        }
        let ranges = chunk_ranges(&unknown);
        for r in bao_tree::io::sync::valid_ranges(&self.outboard, &self.data, &ranges) {
            let r = r?;
            // Only whole groups count (the last may be short).
            let start = r.start.0.div_ceil(CHUNKS_PER_GROUP);
            let end_chunk = r.end.0;
            let end = if end_chunk >= tree(self.size).chunks().0 {
                total
            } else {
                end_chunk / CHUNKS_PER_GROUP
            };
            found.insert_range(start, end);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(dir: &Path, name: &str, len: usize, seed: u8) -> std::path::PathBuf {
        let p = dir.join(name);
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
            .collect();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// The answer for `groups` of `src`, as bytes.
    fn answer(src: &Path, ob: &Path, hash: FileHash, size: u64, groups: &[(u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        serve(
            &File::open(src).unwrap(),
            File::open(ob).unwrap(),
            hash,
            size,
            groups,
            &mut out,
            true,
        )
        .unwrap();
        out
    }

    #[test]
    fn a_file_moves_group_by_group_and_resumes_from_what_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let len = 40 * 16 * 1024 + 1234;
        let src = file_of(dir.path(), "src", len, 1);
        let (hash, size) = hash_file(&src, &dir.path().join("src.obao")).unwrap();
        assert_eq!(
            hash.0,
            *blake3::hash(&std::fs::read(&src).unwrap()).as_bytes()
        );
        assert_eq!(size, len as u64);
        let total = groups_of(size);
        assert_eq!(total, 41);

        // The first half arrives, then "the connection drops".
        let (part, part_ob) = (dir.path().join("part"), dir.path().join("part.obao"));
        let mut rx = Receiving::open(&part, &part_ob, hash, size).unwrap();
        let mut have = GroupSet::new();
        let first = answer(
            &src,
            &dir.path().join("src.obao"),
            hash,
            size,
            &[(0, total)],
        );
        let cut = &first[..first.len() / 2];
        let e = rx
            .take(&[(0, total)], cut, |g, _| {
                have.insert(g);
                true
            })
            .unwrap_err();
        assert!(matches!(e, ReceiveError::Stream(_)), "{e}");
        assert!(have.count() > 10 && have.count() < 30, "{have:?}");
        drop(rx);

        // After a "crash" that lost the saved state: what is on disk is
        // found again by hashing it.
        let rx = Receiving::open(&part, &part_ob, hash, size).unwrap();
        let found = rx.recover(&GroupSet::new()).unwrap();
        assert_eq!(found, have);

        // The rest is asked for and arrives; the file is whole.
        let mut rx = rx;
        let missing = found.missing(total, 64);
        let rest = answer(&src, &dir.path().join("src.obao"), hash, size, &missing);
        // Resuming costs only what was missing (plus its hash pairs).
        assert!(rest.len() < first.len() - cut.len() + 16 * 1024 + 4096);
        let mut all = found.clone();
        rx.take(&missing, rest.as_slice(), |g, _| {
            all.insert(g);
            true
        })
        .unwrap();
        assert!(all.covers(total));
        rx.sync().unwrap();
        assert_eq!(std::fs::read(&part).unwrap(), std::fs::read(&src).unwrap());
        assert_eq!(rx.recover(&GroupSet::new()).unwrap().count(), total);
    }

    #[test]
    fn a_lying_sender_is_caught_at_the_first_bad_group() {
        let dir = tempfile::tempdir().unwrap();
        let src = file_of(dir.path(), "src", 10 * 16 * 1024, 2);
        let ob = dir.path().join("src.obao");
        let (hash, size) = hash_file(&src, &ob).unwrap();
        let mut bytes = answer(&src, &ob, hash, size, &[(0, 10)]);
        // Flip a byte well inside the stream (group 6 or so).
        let at = bytes.len() * 6 / 10;
        bytes[at] ^= 0x40;
        let part = dir.path().join("part");
        let mut rx = Receiving::open(&part, &dir.path().join("p.obao"), hash, size).unwrap();
        let mut have = GroupSet::new();
        let e = rx
            .take(&[(0, 10)], bytes.as_slice(), |g, _| {
                have.insert(g);
                true
            })
            .unwrap_err();
        let ReceiveError::Mismatch { group } = e else {
            panic!("{e}");
        };
        assert!((4..=7).contains(&group), "{group}");
        // Nothing past the bad group was taken as verified.
        assert!(have.ranges().iter().all(|&(_, e)| e <= group), "{have:?}");
        // And the bad bytes are not counted after a crash either.
        let found = rx.recover(&GroupSet::new()).unwrap();
        assert!(!found.contains(group));
    }

    #[test]
    fn a_changed_source_fails_to_serve_instead_of_sending_bad_data() {
        let dir = tempfile::tempdir().unwrap();
        let src = file_of(dir.path(), "src", 5 * 16 * 1024, 3);
        let ob = dir.path().join("src.obao");
        let (hash, size) = hash_file(&src, &ob).unwrap();
        let mut changed = std::fs::read(&src).unwrap();
        changed[3 * 16 * 1024 + 5] ^= 1;
        std::fs::write(&src, changed).unwrap();
        let e = serve(
            &File::open(&src).unwrap(),
            File::open(&ob).unwrap(),
            hash,
            size,
            &[(0, 5)],
            io::sink(),
            true,
        )
        .unwrap_err();
        assert!(matches!(e, ServeError::SourceChanged(_)), "{e}");
        // Unchecked, the bad group goes out, and the receiver refuses it.
        let mut bytes = Vec::new();
        serve(
            &File::open(&src).unwrap(),
            File::open(&ob).unwrap(),
            hash,
            size,
            &[(0, 5)],
            &mut bytes,
            false,
        )
        .unwrap();
        let part = dir.path().join("part");
        let mut rx = Receiving::open(&part, &dir.path().join("p.obao"), hash, size).unwrap();
        let e = rx
            .take(&[(0, 5)], bytes.as_slice(), |_, _| true)
            .unwrap_err();
        assert!(matches!(e, ReceiveError::Mismatch { group: 3 }), "{e}");
    }

    #[test]
    fn tiny_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, 1024, 16 * 1024, 16 * 1024 + 1] {
            let src = file_of(dir.path(), &format!("s{len}"), len, 4);
            let ob = dir.path().join(format!("s{len}.obao"));
            let (hash, size) = hash_file(&src, &ob).unwrap();
            if len == 0 {
                assert_eq!(hash, empty_hash());
                continue;
            }
            let total = groups_of(size);
            let bytes = answer(&src, &ob, hash, size, &[(0, total)]);
            let part = dir.path().join(format!("p{len}"));
            let mut rx =
                Receiving::open(&part, &dir.path().join(format!("p{len}.obao")), hash, size)
                    .unwrap();
            let mut have = GroupSet::new();
            rx.take(&[(0, total)], bytes.as_slice(), |g, _| {
                have.insert(g);
                true
            })
            .unwrap();
            assert!(have.covers(total), "{len}: {have:?}");
            assert_eq!(std::fs::read(&part).unwrap(), std::fs::read(&src).unwrap());
        }
    }

    /// The seeds of the `files_frames` fuzz target: a control message, a
    /// range request, and a whole valid answer for the target's fixture
    /// file. `WRITE_FUZZ_SEEDS=1 cargo test -p mesh-core --lib files_fuzz_seeds`
    /// writes them again after a format change.
    #[test]
    fn files_fuzz_seeds_decode() {
        use crate::files::{FileFrame, Offer, RangeRequest, TransferId};
        let seeds_dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/files_frames");
        let dir = tempfile::tempdir().unwrap();
        // The fuzz target's fixture (same bytes).
        let data: Vec<u8> = (0..5 * 16 * 1024 + 77)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let src = dir.path().join("src");
        std::fs::write(&src, &data).unwrap();
        let ob = dir.path().join("src.obao");
        let (hash, size) = hash_file(&src, &ob).unwrap();
        let id = TransferId([3; 16]);
        let request = RangeRequest {
            id,
            hash,
            groups: vec![(0, groups_of(size))],
            zstd: false,
        }
        .encode();
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            (
                "offer",
                FileFrame::Offer(Offer {
                    id,
                    hash,
                    size,
                    name: "a.bin".into(),
                    zstd: false,
                })
                .encode(),
            ),
            ("request", request[2..].to_vec()),
            (
                "answer",
                answer(&src, &ob, hash, size, &[(0, groups_of(size))]),
            ),
        ];
        if std::env::var_os("WRITE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(&seeds_dir).unwrap();
            for (name, bytes) in &seeds {
                std::fs::write(seeds_dir.join(name), bytes).unwrap();
            }
        }
        for (name, want) in &seeds {
            let got = std::fs::read(seeds_dir.join(name)).unwrap_or_else(|_| {
                panic!("seed {name} missing: WRITE_FUZZ_SEEDS=1 cargo test -p mesh-core --lib files_fuzz_seeds")
            });
            assert_eq!(
                &got, want,
                "seed {name} is stale: WRITE_FUZZ_SEEDS=1 cargo test -p mesh-core --lib files_fuzz_seeds"
            );
        }
    }
}
