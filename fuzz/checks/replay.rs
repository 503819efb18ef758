//! Replays a fuzz target's committed corpus (`fuzz/seeds/<target>/`) through
//! its check, then a fixed, seeded set of mutants of every seed: what CI runs
//! of the fuzz targets, since it has no libFuzzer. The mutations are
//! libFuzzer's cheapest (bit flips, byte sets, cuts, insertions, deletions,
//! repeats, splices with another seed), drawn from a xorshift generator so
//! that every run, and every failure, is the same.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// The committed corpus of `target`, sorted by file name.
pub fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a readable corpus folder").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    seeds.sort();
    seeds
}

/// Runs `check` on every seed of `target` and on `mutants` mutants of each;
/// returns how many inputs ran. A panic fails the test naming the input,
/// which is written next to the corpus (git-ignored `fuzz/artifacts/`) so
/// it can be replayed under libFuzzer or committed as a regression.
pub fn replay(target: &str, check: fn(&[u8]), mutants: usize) -> usize {
    let seeds = seeds(target);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    let mut runs = 0;
    for (path, bytes) in &seeds {
        run(target, check, bytes, || path.display().to_string());
        runs += 1;
    }
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for (s, (path, seed)) in seeds.iter().enumerate() {
        for m in 0..mutants {
            let other = &seeds[rng.below(seeds.len())].1;
            let mutant = mutate(seed, other, &mut rng);
            run(target, check, &mutant, || {
                format!("mutant {m} of seed {s} ({})", path.display())
            });
            runs += 1;
        }
    }
    runs
}

fn run(target: &str, check: fn(&[u8]), input: &[u8], name: impl Fn() -> String) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/artifacts")
            .join(target);
        let file = dir.join(format!("replay-{:016x}", fnv1a(input)));
        let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, input));
        panic!(
            "{target}: {} panicked (above); input saved as {} ({saved:?}); once fixed, copy it \
             into fuzz/seeds/{target}/",
            name(),
            file.display()
        );
    }
}

/// One to four mutations of `seed`; `other` is spliced in by one of them.
fn mutate(seed: &[u8], other: &[u8], rng: &mut XorShift) -> Vec<u8> {
    let mut m = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let len = m.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                m[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                m[i] = [0, 1, 0x7f, 0x80, 0xff, rng.next() as u8][rng.below(6)];
            }
            2 => m.truncate(rng.below(len + 1)),
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                m.splice(at..at, fill);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(16)).min(len);
                m.drain(at..end);
            }
            5 if len > 0 => {
                // Repeat a chunk in place (a duplicated field or block).
                let at = rng.below(len);
                let end = (at + 1 + rng.below(32)).min(len);
                let chunk = m[at..end].to_vec();
                m.splice(at..at, chunk);
            }
            6 if !other.is_empty() => {
                // Keep a prefix of this seed and a suffix of the other.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                m.truncate(cut);
                m.extend_from_slice(&other[from..]);
            }
            _ if len >= 4 => {
                // An interesting 32-bit value at a random place (sizes, counts).
                let i = rng.below(len - 3);
                let v = [0u32, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX, 348, 352][rng.below(7)];
                m[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => m.push(rng.next() as u8),
        }
    }
    m
}

/// Marsaglia's xorshift64: deterministic and good enough to pick mutations.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform enough in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A stable name for a saved input.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
