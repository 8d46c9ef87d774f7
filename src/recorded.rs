//! Recorded scores: the raw scores of one compression written to a file, and read back by a later compression
//! of the same sequence with the same scorer (option `scores`), so that a benchmark compares budgets and
//! selections on one scoring. Reconstruction scoring decodes the whole context again (seconds to minutes);
//! choosing the cells from its scores takes milliseconds.
//!
//! ```text
//! compress(options with scores=F):
//!     F missing:  score every layer as usual; record(l, heads, ws, raw scores of each head)
//!                 after the plan is built: write F
//!     F present:  nothing is decoded again for a reconstruction (the probe alone is decoded, as its window);
//!                 the scorer of layer l is replay(l, heads, ws): the recorded rows, if the layer, its heads
//!                 and the window start are the ones recorded, else an error naming the mismatch
//! ```
//!
//! File (little-endian): `CKVSCORES1\n`, u32 n_layer, then per layer u32 n_heads (0: not scored), u32 ws,
//! n_heads u32 head indices, n_heads x ws f32.
//!
//! Invariants: a replay answers only what was recorded (same layer, same heads in the same order, same number
//! of scored tokens) and never guesses; a recorded file is written whole (a temporary file renamed) and only
//! after a plan was built from the scores it holds; reading validates every length before it allocates.

use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: &[u8] = b"CKVSCORES1\n";

/// One layer's raw scores: `scores[j]` is head `heads[j]`'s, one value per token `0..ws`.
#[derive(Debug, Clone, PartialEq)]
struct Layer {
    heads: Vec<usize>,
    ws: usize,
    scores: Vec<Vec<f32>>,
}

/// The raw scores of every scored layer of one compression.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    layers: Vec<Option<Layer>>,
}

impl Recorded {
    /// Nothing recorded yet, for a model of `n_layer` layers.
    pub fn new(n_layer: usize) -> Recorded {
        Recorded {
            layers: vec![None; n_layer],
        }
    }

    /// Record layer `l`'s scores of `heads` (one row of `ws` values each).
    pub fn record(&mut self, l: usize, heads: &[usize], ws: usize, scores: &[Vec<f32>]) -> Result<()> {
        if l >= self.layers.len() || scores.len() != heads.len() || scores.iter().any(|s| s.len() != ws) {
            return Err(Error::InvalidArg(format!(
                "recorded scores of layer {l}: {} rows for {} heads of {ws} tokens ({} layers)",
                scores.len(),
                heads.len(),
                self.layers.len()
            )));
        }
        self.layers[l] = Some(Layer {
            heads: heads.to_vec(),
            ws,
            scores: scores.to_vec(),
        });
        Ok(())
    }

    /// The recorded scores of layer `l` for `heads` and `ws` tokens, or an error naming what differs.
    pub fn replay(&self, l: usize, heads: &[usize], ws: usize) -> Result<Vec<Vec<f32>>> {
        let Some(Some(r)) = self.layers.get(l) else {
            return Err(Error::InvalidArg(format!("the recorded scores hold no layer {l}")));
        };
        if r.heads != heads || r.ws != ws {
            return Err(Error::InvalidArg(format!(
                "the recorded scores of layer {l} are of heads {:?} over {} tokens, asked for heads {heads:?} over {ws}: \
                 not the same sequence or scorer",
                r.heads, r.ws
            )));
        }
        Ok(r.scores.clone())
    }

    /// The file's bytes (see the module doc).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        let u32le = |b: &mut Vec<u8>, x: usize| b.extend_from_slice(&(x as u32).to_le_bytes());
        u32le(&mut b, self.layers.len());
        for layer in &self.layers {
            match layer {
                None => {
                    u32le(&mut b, 0);
                    u32le(&mut b, 0);
                }
                Some(r) => {
                    u32le(&mut b, r.heads.len());
                    u32le(&mut b, r.ws);
                    r.heads.iter().for_each(|&h| u32le(&mut b, h));
                    r.scores
                        .iter()
                        .flatten()
                        .for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
                }
            }
        }
        b
    }

    /// Parse a file's bytes, for a model of `n_layer` layers.
    pub fn from_bytes(bytes: &[u8], n_layer: usize) -> Result<Recorded> {
        let bad = |what: &str| Error::Io(format!("recorded scores: {what}"));
        let mut rest = bytes.strip_prefix(MAGIC).ok_or_else(|| bad("not a scores file"))?;
        // the next `k` bytes of `rest`, or an error when fewer are left
        fn take<'b>(rest: &mut &'b [u8], k: usize) -> Result<&'b [u8]> {
            if k > rest.len() {
                return Err(Error::Io("recorded scores: truncated".into()));
            }
            let (d, r) = rest.split_at(k);
            *rest = r;
            Ok(d)
        }
        let u32le = |rest: &mut &[u8]| take(rest, 4).map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]) as usize);
        let n = u32le(&mut rest)?;
        if n != n_layer {
            return Err(bad(&format!("{n} layers recorded, the model has {n_layer}")));
        }
        let mut layers = Vec::with_capacity(n);
        for _ in 0..n {
            let (n_heads, ws) = (u32le(&mut rest)?, u32le(&mut rest)?);
            if n_heads == 0 {
                layers.push(None);
                continue;
            }
            if n_heads > bytes.len() / 4 {
                return Err(bad("truncated"));
            }
            let heads = (0..n_heads).map(|_| u32le(&mut rest)).collect::<Result<Vec<_>>>()?;
            let k = n_heads.checked_mul(ws).and_then(|x| x.checked_mul(4));
            let data = take(&mut rest, k.ok_or_else(|| bad("truncated"))?)?;
            let vals: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let scores = if ws == 0 {
                vec![Vec::new(); n_heads]
            } else {
                vals.chunks(ws).map(<[f32]>::to_vec).collect()
            };
            layers.push(Some(Layer { heads, ws, scores }));
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Recorded { layers })
    }

    /// Read `path` (see [`Recorded::from_bytes`]).
    pub fn read(path: &Path, n_layer: usize) -> Result<Recorded> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::Io(format!("cannot read the scores {}: {e}", path.display())))?;
        Recorded::from_bytes(&bytes, n_layer).map_err(|e| Error::Io(format!("{}: {}", path.display(), e.message())))
    }

    /// Write `path` whole (a temporary file renamed).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        let io = |e: std::io::Error| Error::Io(format!("cannot write the scores {}: {e}", path.display()));
        std::fs::write(&tmp, self.to_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Recorded {
        let mut r = Recorded::new(3);
        r.record(0, &[0, 2], 3, &[vec![0.5, 0.25, 1.0], vec![0.0, -1.5, 3.0]])
            .unwrap();
        r.record(2, &[1], 2, &[vec![7.0, f32::MIN_POSITIVE]]).unwrap();
        r
    }

    #[test]
    fn a_written_file_replays_exactly_what_was_recorded() {
        let r = sample();
        let back = Recorded::from_bytes(&r.to_bytes(), 3).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.replay(0, &[0, 2], 3).unwrap()[1], vec![0.0, -1.5, 3.0]);
        assert_eq!(back.replay(2, &[1], 2).unwrap(), vec![vec![7.0, f32::MIN_POSITIVE]]);
        let path = std::env::temp_dir().join(format!("ckv-recorded-{}.bin", std::process::id()));
        r.write(&path).unwrap();
        assert_eq!(Recorded::read(&path, 3).unwrap(), r);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_replay_refuses_what_was_not_recorded() {
        let r = sample();
        assert!(r.replay(1, &[0], 3).unwrap_err().message().contains("no layer 1"));
        assert!(r.replay(5, &[0], 3).is_err());
        // other heads, another order, another window start: another scorer or sequence
        for (heads, ws) in [(&[0usize][..], 3), (&[2, 0][..], 3), (&[0, 2][..], 4)] {
            let e = r.replay(0, heads, ws).unwrap_err();
            assert!(e.message().contains("not the same sequence or scorer"), "{e:?}");
        }
        assert!(Recorded::new(1).record(0, &[0, 1], 2, &[vec![1.0, 2.0]]).is_err());
        assert!(Recorded::new(1).record(1, &[0], 1, &[vec![1.0]]).is_err());
    }

    #[test]
    fn reading_refuses_a_damaged_or_foreign_file() {
        let b = sample().to_bytes();
        assert!(Recorded::from_bytes(&b, 4)
            .unwrap_err()
            .message()
            .contains("3 layers recorded"));
        assert!(Recorded::from_bytes(b"CKVGATE\n", 3).is_err());
        for cut in [MAGIC.len() + 2, b.len() - 1] {
            assert!(Recorded::from_bytes(&b[..cut], 3)
                .unwrap_err()
                .message()
                .contains("truncated"));
        }
        let mut long = b.clone();
        long.push(0);
        assert!(Recorded::from_bytes(&long, 3)
            .unwrap_err()
            .message()
            .contains("trailing"));
        // a head count that would need more bytes than the file has
        let mut huge = MAGIC.to_vec();
        for x in [1u32, u32::MAX, u32::MAX] {
            huge.extend_from_slice(&x.to_le_bytes());
        }
        assert!(Recorded::from_bytes(&huge, 1).is_err());
        assert!(Recorded::read(Path::new("/nonexistent/ckv-scores.bin"), 3).is_err());
    }
}
