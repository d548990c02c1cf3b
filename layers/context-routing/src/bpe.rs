//! Token counts of OpenAI's byte-level BPE encodings (`o200k_base`, `cl100k_base`), from
//! tiktoken's own tables, in a tenth of the memory.
//!
//! Hand-made on purpose, and measured: `tiktoken-rs`'s `CoreBPE` keeps every table three times
//! (encoder, decoder and a sorted copy, each token its own allocation) and 256 regex clones:
//! 46 MB resident for `o200k_base`, a third of the gateway's memory with 1,000 open streams
//! (docs/performance.md, "Memory"). Counting needs only "which rank has these bytes": here every
//! token's bytes sit in one buffer, indexed by rank, found through a table of ranks (~4 MB for
//! `o200k_base`). The tables come from `tiktoken-rs` (decoded once at load, then dropped), the
//! pre-tokenizer patterns and the merge rule are tiktoken's, and the counts equal `tiktoken-rs`'s
//! `count_ordinary` (property test `counts_equal_tiktoken`).

use std::{cmp::Reverse, collections::BinaryHeap, hash::BuildHasher};

use fancy_regex::Regex;
use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;
use tiktoken_rs::{CoreBPE, Rank};

/// `cl100k_base`'s pre-tokenizer, as `tiktoken-rs` 0.12 builds it (it exports only o200k's).
pub(crate) const CL100K_PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";

/// Counts the tokens of texts in one encoding.
pub(crate) struct TokenCounter {
    pattern: Regex,
    ranks: RankTable,
}

impl TokenCounter {
    /// The counter of `bpe`'s ordinary tokens, pre-tokenized with `pattern` (the encoding's).
    pub(crate) fn new(bpe: &CoreBPE, pattern: &str) -> Result<Self, String> {
        let pattern = Regex::new(pattern).map_err(|error| error.to_string())?;
        Ok(Self { pattern, ranks: RankTable::of(bpe)? })
    }

    /// The number of tokens `text` encodes to, special tokens read as ordinary text (tiktoken's
    /// `encode_ordinary(text).len()`).
    pub(crate) fn count(&self, text: &str) -> usize {
        let mut tokens = 0;
        let mut counted_to = 0;
        for piece in self.pattern.find_iter(text) {
            match piece {
                Ok(piece) => {
                    tokens += self.count_piece(piece.as_str().as_bytes());
                    counted_to = piece.end();
                }
                // The pattern's look-ahead gave up (fancy-regex's backtrack limit): every token
                // covers at least a byte, so the rest's bytes bound its tokens.
                Err(_) => return tokens + (text.len() - counted_to),
            }
        }
        tokens
    }

    /// The tokens of one pre-tokenized piece: tiktoken's merge rule (the adjacent pair whose
    /// joined bytes have the lowest rank merges first, the leftmost on a tie) with a heap, so a
    /// long piece (a base64 blob) costs O(n log n).
    fn count_piece(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        if n < 2 || self.ranks.rank(piece).is_some() {
            return n.min(1);
        }
        // Parts are byte ranges named by their start: `end[s]` is where part `s` ends,
        // `before[s]` the part before it, `joined[s]` the rank of part `s` joined with the next
        // (MAX: not a token, or `s` is no longer a part). A heap entry whose rank differs from
        // `joined` is stale.
        let mut end: Vec<usize> = (1..=n).collect();
        let mut before: Vec<usize> = (0..n).map(|s| s.wrapping_sub(1)).collect();
        let mut joined = vec![Rank::MAX; n];
        let mut heap = BinaryHeap::with_capacity(n);
        let consider = |joined: &mut [Rank], heap: &mut BinaryHeap<Reverse<(Rank, usize)>>, s: usize, to: usize| {
            joined[s] = match piece.get(s..to).and_then(|bytes| self.ranks.rank(bytes)) {
                Some(rank) => {
                    heap.push(Reverse((rank, s)));
                    rank
                }
                None => Rank::MAX,
            };
        };
        for s in 0..n - 1 {
            consider(&mut joined, &mut heap, s, s + 2);
        }
        let mut parts = n;
        while let Some(Reverse((rank, left))) = heap.pop() {
            if joined[left] != rank {
                continue;
            }
            let right = end[left];
            let after = end[right];
            end[left] = after;
            joined[right] = Rank::MAX;
            parts -= 1;
            match end.get(after) {
                Some(&next_end) => {
                    before[after] = left;
                    consider(&mut joined, &mut heap, left, next_end);
                }
                None => joined[left] = Rank::MAX,
            }
            if left > 0 {
                consider(&mut joined, &mut heap, before[left], after);
            }
        }
        parts
    }
}

/// Every ordinary token's bytes in one buffer, by rank, and a hash table of ranks by bytes.
struct RankTable {
    bytes: Vec<u8>,
    /// `starts[r]..starts[r + 1]`: the bytes of rank `r`.
    starts: Vec<u32>,
    index: HashTable<Rank>,
    hasher: FxBuildHasher,
}

impl RankTable {
    /// The ordinary tokens of `bpe`: ranks 0, 1, … up to the first rank it cannot decode (the
    /// special tokens sit past a gap in both encodings).
    fn of(bpe: &CoreBPE) -> Result<Self, String> {
        let (mut bytes, mut starts) = (Vec::new(), vec![0]);
        let mut rank: Rank = 0;
        while let Ok(token) = bpe.decode_bytes(&[rank]) {
            bytes.extend_from_slice(&token);
            starts.push(u32::try_from(bytes.len()).map_err(|_| "token tables over 4 GiB")?);
            rank += 1;
        }
        bytes.shrink_to_fit();
        starts.shrink_to_fit();
        let hasher = FxBuildHasher;
        let token = |r: Rank| &bytes[starts[r as usize] as usize..starts[r as usize + 1] as usize];
        let mut index = HashTable::with_capacity(rank as usize);
        for r in 0..rank {
            index.insert_unique(hasher.hash_one(token(r)), r, |&r| hasher.hash_one(token(r)));
        }
        Ok(Self { bytes, starts, index, hasher })
    }

    fn token(&self, rank: Rank) -> &[u8] {
        let rank = rank as usize;
        &self.bytes[self.starts[rank] as usize..self.starts[rank + 1] as usize]
    }

    fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        self.index.find(self.hasher.hash_one(bytes), |&rank| self.token(rank) == bytes).copied()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use proptest::prelude::*;

    use super::*;

    static O200K: LazyLock<(CoreBPE, TokenCounter)> = LazyLock::new(|| {
        let bpe = tiktoken_rs::o200k_base().unwrap();
        let counter = TokenCounter::new(&bpe, tiktoken_rs::O200K_BASE_PAT_STR).unwrap();
        (bpe, counter)
    });
    static CL100K: LazyLock<(CoreBPE, TokenCounter)> = LazyLock::new(|| {
        let bpe = tiktoken_rs::cl100k_base().unwrap();
        let counter = TokenCounter::new(&bpe, CL100K_PATTERN).unwrap();
        (bpe, counter)
    });

    fn assert_same(text: &str) {
        for (name, (bpe, counter)) in [("o200k", &*O200K), ("cl100k", &*CL100K)] {
            assert_eq!(counter.count(text), bpe.count_ordinary(text), "{name}: {text:?}");
        }
    }

    #[test]
    fn tables_hold_every_ordinary_token() {
        assert_eq!(O200K.1.ranks.starts.len() - 1, 199_998);
        assert_eq!(CL100K.1.ranks.starts.len() - 1, 100_256);
    }

    #[test]
    fn counts_equal_tiktoken_on_known_texts() {
        for text in [
            "",
            "Hello world",
            "  leading and trailing spaces  \n\n",
            "<|endoftext|> is read as text",
            "naïve café 東京 🚀🚀 ١٢٣٤ 12345678",
            "fn main() { println!(\"{}\", 1 + 2); }\r\n\tindent",
            &"a".repeat(5000),
            &"QmFzZTY0IGJsb2Igd2l0aCBubyBzcGFjZXM=".repeat(300),
            &"🙂".repeat(700),
        ] {
            assert_same(text);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Short mixed texts: letters, digits, marks, emoji, whitespace, punctuation, contractions.
        #[test]
        fn counts_equal_tiktoken(text in "([a-zA-Z]{1,8}|[0-9]{1,5}|'s|'ll|[ \t\r\n]{1,3}|[.,!?/(){}<>|-]{1,3}|é|ß|東京|🚀|\u{0301}|[\u{0600}-\u{06FF}]{1,4}){0,40}") {
            assert_same(&text);
        }

        /// Any text at all.
        #[test]
        fn counts_equal_tiktoken_on_any_text(text in any::<String>()) {
            assert_same(&text);
        }

        /// Long pieces without a break, where the merge order matters most.
        #[test]
        fn counts_equal_tiktoken_on_long_pieces(text in "[a-zA-Z0-9+/=]{100,600}|[!-/:-@]{100,300}|[ ]{100,300}x") {
            assert_same(&text);
        }
    }
}
