//! The calibration's graph callback: per layer, the attention softmax rows (`kq_soft_max-<l>`) and the
//! attention output after the output projection (the matmul with `blk.<l>.attn_output.weight`).
//!
//! Phases: `Window` and `Step` keep the softmax rows of the last decode; `Full` (pass 1) keeps each layer's
//! output; `Comp` (pass 2) restricts every softmax row to the layer's kept cells (renormalised), measures
//! the output's relative distance to pass 1's and writes pass 1's output back, so that every layer sees the
//! full-cache residual stream. Problems met inside the callback stop the graph and are left in `error`.

use crate::common::eval::{Observer, Tensor};

/// What the callback does during the next decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Observe nothing.
    Idle,
    /// Keep the window's softmax rows.
    Window,
    /// Keep one decode step's softmax rows (SRH probes).
    Step,
    /// Keep the attention outputs (pass 1).
    Full,
    /// Restrict the softmax to `keep`, measure and restore the outputs (pass 2).
    Comp,
}

/// The callback's state, read by the tool between decodes.
pub struct Calib {
    /// The phase of the decode in progress.
    pub phase: Phase,
    n_layer: usize,
    /// Per layer, the softmax rows of the last capture: [n_head][n_tokens][n_kv].
    pub probs: Vec<Vec<f32>>,
    /// n_kv, n_tokens, n_head of the last capture.
    pub probs_ne: [i64; 3],
    /// Per layer, pass 1's attention output.
    pub o_full: Vec<Vec<f32>>,
    /// Per layer, the summed relative error of pass 2.
    pub err: Vec<f64>,
    /// Per layer, per cell: kept in pass 2 (cells past the end are kept).
    pub keep: Vec<Vec<bool>>,
    /// Per layer: the output projection was met during this decode.
    pub seen: Vec<bool>,
    /// The first problem met inside the callback.
    pub error: String,
    buf: Vec<f32>,
}

enum Node {
    None,
    Softmax(i64),
    Wo(i64),
}

/// `atoi`: the leading decimal digits (after an optional sign), 0 without any.
fn atoi(s: &[u8]) -> i64 {
    let (neg, s) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let v = s
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .fold(0i64, |v, &c| v.saturating_mul(10).saturating_add((c - b'0') as i64));
    if neg {
        -v
    } else {
        v
    }
}

fn classify(t: &Tensor<'_>) -> Node {
    if let Some(rest) = t.name().strip_prefix(b"kq_soft_max-") {
        return Node::Softmax(atoi(rest));
    }
    if t.is_mul_mat() {
        if let Some(rest) = t.src0_name().and_then(|n| n.strip_prefix(b"blk.")) {
            let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
            if digits > 0 && &rest[digits..] == b".attn_output.weight" {
                return Node::Wo(atoi(&rest[..digits]));
            }
        }
    }
    Node::None
}

impl Calib {
    /// The state for a model of `n_layer` layers, idle.
    pub fn new(n_layer: usize) -> Calib {
        Calib {
            phase: Phase::Idle,
            n_layer,
            probs: vec![Vec::new(); n_layer],
            probs_ne: [0; 3],
            o_full: vec![Vec::new(); n_layer],
            err: vec![0.0; n_layer],
            keep: vec![Vec::new(); n_layer],
            seen: vec![false; n_layer],
            error: String::new(),
            buf: Vec::new(),
        }
    }

    /// The node's kind and layer if this phase wants it.
    fn wanted(&self, t: &Tensor<'_>) -> Option<Node> {
        if self.phase == Phase::Idle {
            return None;
        }
        match classify(t) {
            n @ Node::Softmax(_) if self.phase != Phase::Full => Some(n),
            n @ Node::Wo(_) if matches!(self.phase, Phase::Full | Phase::Comp) => Some(n),
            _ => None,
        }
    }

    fn fail(&mut self, msg: String) -> bool {
        self.error = msg;
        false
    }

    fn softmax(&mut self, t: &mut Tensor<'_>, il: usize) -> bool {
        t.read_f32(&mut self.probs[il]);
        let ne = t.ne();
        self.probs_ne = [ne[0], ne[1], ne[2]];
        if self.phase != Phase::Comp {
            return true;
        }
        // restrict every head's row to the kept cells, renormalised
        let n_kv = ne[0] as usize;
        let keep = &self.keep[il];
        let p = &mut self.probs[il];
        for row in p.chunks_exact_mut(n_kv).take((ne[1] * ne[2]) as usize) {
            let mut sum = 0.0f64;
            for (i, v) in row.iter_mut().enumerate() {
                if i < keep.len() && !keep[i] {
                    *v = 0.0;
                }
                sum += *v as f64;
            }
            if sum <= 0.0 {
                return self.fail("a head attends to no kept cell".into());
            }
            for v in row.iter_mut() {
                *v = (*v as f64 / sum) as f32;
            }
        }
        t.write_f32(&self.probs[il]);
        true
    }

    fn output(&mut self, t: &mut Tensor<'_>, il: usize) -> bool {
        if self.phase == Phase::Full {
            t.read_f32(&mut self.o_full[il]);
        } else {
            let n = t.n_elements();
            if self.o_full[il].len() != n {
                return self.fail("pass 2 output shape differs from pass 1".into());
            }
            t.read_f32(&mut self.buf);
            let full = &self.o_full[il];
            let (mut d2, mut f2) = (0.0f64, 0.0f64);
            for (&c, &f) in self.buf.iter().zip(full) {
                let d = c as f64 - f as f64;
                d2 += d * d;
                f2 += f as f64 * f as f64;
            }
            self.err[il] += d2.sqrt() / (f2.sqrt() + 1e-5);
            t.write_f32(full);
        }
        self.seen[il] = true;
        true
    }
}

impl Observer for Calib {
    fn wants(&mut self, t: &Tensor<'_>) -> bool {
        self.wanted(t).is_some()
    }

    fn observe(&mut self, t: &mut Tensor<'_>) -> bool {
        let Some(node) = self.wanted(t) else {
            return true;
        };
        let (Node::Softmax(il) | Node::Wo(il)) = node else {
            return true;
        };
        if il < 0 || il >= self.n_layer as i64 {
            let name = String::from_utf8_lossy(t.name()).into_owned();
            return self.fail(format!("unexpected layer index in node {name}"));
        }
        if !t.is_f32_contiguous() {
            let name = String::from_utf8_lossy(t.name()).into_owned();
            return self.fail(format!("node {name} is not contiguous f32"));
        }
        match node {
            Node::Softmax(_) => self.softmax(t, il as usize),
            _ => self.output(t, il as usize),
        }
    }
}
