//! The Merkle tree of RFC 6962 / RFC 9162 (§2.1): leaf and node hashes with
//! domain separation, tree roots of any prefix, inclusion and consistency
//! proofs, and their verification from the proof and a root alone.

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// `SHA-256(0x00 || data)`: the hash of a leaf.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`: the hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Why a proof cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The index is not a leaf of a tree of that size.
    #[error("leaf {index} is not in a tree of {size} leaves")]
    IndexOutOfRange {
        /// Leaf asked for.
        index: u64,
        /// Tree size.
        size: u64,
    },
    /// A size larger than the tree, or an old size above the new one.
    #[error("tree size {size} is not available (the tree has {len} leaves)")]
    SizeOutOfRange {
        /// Size asked for.
        size: u64,
        /// Leaves held.
        len: u64,
    },
}

/// Largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// An append-only Merkle tree that keeps every complete subtree's hash, so a
/// root, inclusion proof or consistency proof for any prefix costs
/// O(log n) hashes. Memory: about two hashes (64 bytes) per leaf.
#[derive(Debug, Clone, Default)]
pub struct MerkleTree {
    /// `levels[k][i]` is the hash of leaves `[i·2^k, (i+1)·2^k)`.
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a leaf hash (see [`leaf_hash`]). Amortised one node hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            let row = &mut self.levels[level];
            row.push(node);
            if row.len() % 2 == 1 {
                break;
            }
            node = node_hash(&row[row.len() - 2], &row[row.len() - 1]);
            level += 1;
        }
    }

    /// Drops leaves beyond `len` (undoing pushes that were not committed).
    pub fn truncate(&mut self, len: u64) {
        for (k, row) in self.levels.iter_mut().enumerate() {
            row.truncate((len >> k) as usize);
        }
        while self.levels.last().is_some_and(Vec::is_empty) {
            self.levels.pop();
        }
    }

    /// The leaf hash at `index`.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.levels
            .first()?
            .get(usize::try_from(index).ok()?)
            .copied()
    }

    /// The root of the whole tree.
    pub fn root(&self) -> Hash {
        self.root_at(self.len()).unwrap_or_else(|_| empty_root())
    }

    /// The root of the tree of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        self.check_size(size)?;
        Ok(if size == 0 {
            empty_root()
        } else {
            self.subtree(0, size)
        })
    }

    fn check_size(&self, size: u64) -> Result<(), ProofError> {
        if size > self.len() {
            return Err(ProofError::SizeOutOfRange {
                size,
                len: self.len(),
            });
        }
        Ok(())
    }

    /// MTH(D[lo..hi]) for a range RFC 6962's recursion produces: `lo` is a
    /// multiple of the largest power of two not above `hi - lo`.
    fn subtree(&self, lo: u64, hi: u64) -> Hash {
        let n = hi - lo;
        if n.is_power_of_two() && lo.is_multiple_of(n) {
            let k = n.trailing_zeros() as usize;
            return self.levels[k][(lo >> k) as usize];
        }
        let k = split(n);
        node_hash(&self.subtree(lo, lo + k), &self.subtree(lo + k, hi))
    }

    /// The audit path of leaf `index` in the tree of the first `size` leaves
    /// (RFC 6962 §2.1.1).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(size)?;
        if index >= size {
            return Err(ProofError::IndexOutOfRange { index, size });
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Ok(proof)
    }

    fn path(&self, m: u64, lo: u64, hi: u64, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if n == 1 {
            return;
        }
        let k = split(n);
        if m < k {
            self.path(m, lo, lo + k, out);
            out.push(self.subtree(lo + k, hi));
        } else {
            self.path(m - k, lo + k, hi, out);
            out.push(self.subtree(lo, lo + k));
        }
    }

    /// The proof that the tree of `old` leaves is a prefix of the tree of
    /// `new` leaves (RFC 6962 §2.1.2). Empty when `old` is 0 or equals `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(new)?;
        if old > new {
            return Err(ProofError::SizeOutOfRange {
                size: old,
                len: new,
            });
        }
        let mut proof = Vec::new();
        if old > 0 && old < new {
            self.subproof(old, 0, new, true, &mut proof);
        }
        Ok(proof)
    }

    fn subproof(&self, m: u64, lo: u64, hi: u64, complete: bool, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if m == n {
            if !complete {
                out.push(self.subtree(lo, hi));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, lo, lo + k, complete, out);
            out.push(self.subtree(lo + k, hi));
        } else {
            self.subproof(m - k, lo + k, hi, false, out);
            out.push(self.subtree(lo, lo + k));
        }
    }
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves whose root
/// is `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a prefix
/// of the tree of `new_size` leaves with root `new_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    old_root: &Hash,
    new_size: u64,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    if old_size == 0 {
        // Every tree extends the empty one, whose root is fixed: a claimed
        // "empty" tree with any other root is not the empty tree.
        return proof.is_empty() && *old_root == empty_root();
    }
    let Some((first, rest)) = proof.split_first() else {
        return false;
    };
    // When the old tree is a complete subtree, its root is the proof's
    // implicit first element.
    let (start, rest) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        (first, rest)
    };
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && fr == *old_root && sr == *new_root
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MTH straight from the RFC's definition, for cross-checking.
    fn reference_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    fn tree(n: u64) -> MerkleTree {
        let mut t = MerkleTree::new();
        for l in leaves(n) {
            t.push(l);
        }
        t
    }

    /// Sizes the issue names: 1, 2, 3, 2^k, 2^k + 1, and some others.
    fn sizes() -> Vec<u64> {
        let mut v = vec![1, 2, 3, 5, 6, 7, 13, 100];
        for k in 2..8 {
            v.push(1 << k);
            v.push((1 << k) + 1);
            v.push((1 << k) - 1);
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn empty_tree_root_is_the_hash_of_nothing() {
        // RFC 6962 test vector: SHA-256 of the empty string.
        assert_eq!(
            data_encoding::HEXLOWER.encode(&MerkleTree::new().root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn roots_match_the_definition_for_every_prefix() {
        let all = leaves(130);
        let t = tree(130);
        for size in 0..=130u64 {
            assert_eq!(
                t.root_at(size).unwrap(),
                reference_root(&all[..size as usize]),
                "{size}"
            );
        }
        assert!(t.root_at(131).is_err());
    }

    #[test]
    fn inclusion_proofs_verify_for_every_leaf_and_fail_when_tampered() {
        let t = tree(130);
        for size in sizes().into_iter().filter(|s| *s <= 130) {
            let root = t.root_at(size).unwrap();
            for index in 0..size {
                let leaf = t.leaf(index).unwrap();
                let proof = t.inclusion_proof(index, size).unwrap();
                assert!(
                    verify_inclusion(&leaf, index, size, &proof, &root),
                    "{index}/{size}"
                );
                // Wrong leaf, index, size, root; a flipped, missing or extra element.
                assert!(!verify_inclusion(
                    &leaf_hash(b"x"),
                    index,
                    size,
                    &proof,
                    &root
                ));
                if size > 1 {
                    assert!(!verify_inclusion(
                        &leaf,
                        (index + 1) % size,
                        size,
                        &proof,
                        &root
                    ));
                }
                // (The size is not re-checked here: the same path can fit two
                // sizes whose roots differ; the signed checkpoint binds size
                // and root together.)
                assert!(!verify_inclusion(
                    &leaf,
                    index,
                    size,
                    &proof,
                    &leaf_hash(b"r")
                ));
                for i in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[i][7] ^= 0x20;
                    assert!(!verify_inclusion(&leaf, index, size, &bad, &root));
                }
                if !proof.is_empty() {
                    assert!(!verify_inclusion(&leaf, index, size, &proof[1..], &root));
                }
                let mut longer = proof.clone();
                longer.push(root);
                assert!(!verify_inclusion(&leaf, index, size, &longer, &root));
            }
            assert!(t.inclusion_proof(size, size).is_err());
        }
    }

    #[test]
    fn an_empty_old_tree_must_have_the_empty_root() {
        let t = tree(5);
        let new_root = t.root_at(5).unwrap();
        assert!(verify_consistency(0, &empty_root(), 5, &new_root, &[]));
        // Any other "old root" for size 0 is a lie about the old tree.
        assert!(!verify_consistency(0, &leaf_hash(b"x"), 5, &new_root, &[]));
        assert!(!verify_consistency(0, &new_root, 5, &new_root, &[]));
    }

    #[test]
    fn consistency_proofs_verify_for_every_pair_and_fail_when_tampered() {
        let t = tree(130);
        for new in sizes().into_iter().filter(|s| *s <= 130) {
            let new_root = t.root_at(new).unwrap();
            for old in 0..=new {
                let old_root = t.root_at(old).unwrap();
                let proof = t.consistency_proof(old, new).unwrap();
                assert!(
                    verify_consistency(old, &old_root, new, &new_root, &proof),
                    "{old}->{new}"
                );
                if old > 0 && old < new {
                    for i in 0..proof.len() {
                        let mut bad = proof.clone();
                        bad[i][0] ^= 1;
                        assert!(!verify_consistency(old, &old_root, new, &new_root, &bad));
                    }
                    assert!(!verify_consistency(
                        old,
                        &old_root,
                        new,
                        &new_root,
                        &proof[1..]
                    ));
                    assert!(!verify_consistency(
                        old,
                        &leaf_hash(b"x"),
                        new,
                        &new_root,
                        &proof
                    ));
                    assert!(!verify_consistency(
                        old,
                        &old_root,
                        new,
                        &leaf_hash(b"y"),
                        &proof
                    ));
                }
            }
            assert!(t.consistency_proof(new + 1, new).is_err());
        }
    }

    #[test]
    fn a_fork_is_not_consistent() {
        let honest = tree(20);
        let mut forked = tree(10);
        for i in 0..10u64 {
            forked.push(leaf_hash(&(1000 + i).to_be_bytes()));
        }
        let proof = forked.consistency_proof(12, 20).unwrap();
        // The forked log's proof from 12 does not connect the honest root at 12.
        assert!(!verify_consistency(
            12,
            &honest.root_at(12).unwrap(),
            20,
            &forked.root(),
            &proof
        ));
    }

    #[test]
    fn truncate_undoes_pushes_exactly() {
        let mut t = tree(77);
        let before: Vec<Hash> = (0..=77).map(|s| t.root_at(s).unwrap()).collect();
        for i in 0..40u64 {
            t.push(leaf_hash(&i.to_le_bytes()));
        }
        t.truncate(77);
        assert_eq!(t.len(), 77);
        for (s, root) in before.iter().enumerate() {
            assert_eq!(t.root_at(s as u64).unwrap(), *root);
        }
        t.truncate(0);
        assert!(t.is_empty());
        assert_eq!(t.root(), empty_root());
    }

    proptest::proptest! {
        #[test]
        fn random_sizes_prove_and_verify(n in 1u64..600, a in 0u64..600, b in 0u64..600) {
            let t = tree(n);
            let (index, old) = (a % n, b % (n + 1));
            let root = t.root();
            let proof = t.inclusion_proof(index, n).unwrap();
            proptest::prop_assert!(verify_inclusion(&t.leaf(index).unwrap(), index, n, &proof, &root));
            let c = t.consistency_proof(old, n).unwrap();
            proptest::prop_assert!(verify_consistency(old, &t.root_at(old).unwrap(), n, &root, &c));
        }
    }
}
