//! An independent f64 evaluation of PyTorch's formulas, for the fuzz test: cross-entropy (class
//! indices or probabilities, label smoothing, class weights, `ignore_index`, reductions, z-loss,
//! soft-cap) and binary cross-entropy on logits, with their gradients. Written from the formulas,
//! element by element, sharing nothing with the crate's kernels.

/// One cross-entropy problem in logical `(outer, C, inner)` order, all values as f64 (already
/// rounded to the dtype under test).
pub struct Ce<'a> {
    pub x: &'a [f64],
    pub outer: usize,
    pub classes: usize,
    pub inner: usize,
    /// Class indices per row (`outer * inner`), or `None` for probability targets.
    pub hard: Option<&'a [i64]>,
    /// Probability targets laid out like `x`.
    pub soft: Option<&'a [f64]>,
    /// PyTorch's uniform smoothing (the `OtherClasses` convention already converted).
    pub eps: f64,
    pub weight: Option<&'a [f64]>,
    pub ignore_index: i64,
    pub z_loss: f64,
    pub softcap: Option<f64>,
}

/// Per-row losses, the mean's denominator and the gradient of `sum_r g_r loss_r` for the row
/// weights `g` given later.
pub struct CeOut {
    pub loss: Vec<f64>,
    /// `sum w_y` over non-ignored class targets, or the row count for probability targets.
    pub denom: f64,
    /// `d loss_r / d x` per row, stored like `x` (rows do not overlap).
    pub dloss: Vec<f64>,
    /// Per element (stored like `x`), the size of the terms its gradient is a difference of:
    /// `p_c (sum_k w_k q_k + 2 z |lse|) + w_c q_c`, with `q` the smoothed target: the terms of
    /// the gradient with respect to the (capped) logits, before the soft-cap's derivative. Where the gradient nearly cancels (a confident correct row, one
    /// class, smoothing near 1) its rounding error is relative to these, not to the result.
    pub terms: Vec<f64>,
}

/// Neumaier's compensated sum: the reference's own rounding stays at an ulp of the result,
/// whatever the number of terms (a plain f64 loop drifts by the term count times that, which
/// for f64 inputs is the size of the bound under test).
pub fn ksum(v: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut c) = (0f64, 0f64);
    for x in v {
        let t = s + x;
        c += if s.abs() >= x.abs() {
            (s - t) + x
        } else {
            (x - t) + s
        };
        s = t;
    }
    if s.is_finite() {
        s + c
    } else {
        s
    }
}

/// `sech^2(v / cap)` computed without cancellation, with `u = v / cap` carried as the rounded
/// quotient plus its exact remainder: `e = exp(-2|u|)` has a relative error of `|u|` ulps when
/// formed from the rounded quotient alone, which at large |u| is the whole f64 bound.
fn sech2(v: f64, cap: f64) -> f64 {
    let q = v / cap;
    if q.is_nan() {
        return q;
    }
    if q.abs() > 400.0 {
        return 0.0; // exp(-800) is 0 in f64
    }
    let lo = (-q).mul_add(cap, v) / cap;
    let lo = if lo.is_finite() { lo } else { 0.0 };
    let s = if q < 0.0 { -1.0 } else { 1.0 };
    let e = (-2.0 * q.abs()).exp() * (-2.0 * s * lo).exp();
    4.0 * e / ((1.0 + e) * (1.0 + e))
}

impl Ce<'_> {
    fn at(&self, n: usize, c: usize, d: usize) -> usize {
        (n * self.classes + c) * self.inner + d
    }

    pub fn eval(&self) -> CeOut {
        let (cn, rows) = (self.classes, self.outer * self.inner);
        let mut loss = vec![0.0; rows];
        let mut dloss = vec![0.0; self.x.len()];
        let mut denom_terms: Vec<f64> = Vec::new();
        let mut terms = vec![0.0; self.x.len()];
        let w = |c: usize| self.weight.map_or(1.0, |w| w[c]);
        let wsum = ksum((0..cn).map(w));
        let eps = self.eps;
        for n in 0..self.outer {
            for d in 0..self.inner {
                let r = n * self.inner + d;
                let mut z = vec![0.0; cn];
                let mut dz = vec![1.0; cn];
                for (c, (zc, dc)) in z.iter_mut().zip(dz.iter_mut()).enumerate() {
                    let v = self.x[self.at(n, c, d)];
                    match self.softcap {
                        Some(cap) => {
                            *zc = cap * (v / cap).tanh();
                            *dc = sech2(v, cap);
                        }
                        None => *zc = v,
                    }
                }
                // log_softmax as PyTorch forms it: (z - m) - log(sum exp(z - m)).
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let se = ksum(z.iter().map(|&v| (v - m).exp()));
                let lse = m + se.ln();
                let l: Vec<f64> = z.iter().map(|&v| (v - m) - se.ln()).collect();
                let p: Vec<f64> = l.iter().map(|&v| v.exp()).collect();
                let zl = self.z_loss * lse * lse;
                let dz_loss = 2.0 * self.z_loss * lse;
                let mut g = vec![0.0; cn];
                let mut t_abs = vec![0.0; cn];
                if let Some(t) = self.hard {
                    let y = t[r];
                    if y == self.ignore_index {
                        continue;
                    }
                    let y = y as usize;
                    let wy = w(y);
                    denom_terms.push(wy);
                    let mut v = (1.0 - eps) * (-wy * l[y]);
                    if eps != 0.0 {
                        let smooth = ksum((0..cn).map(|c| -w(c) * l[c]));
                        v += eps / cn as f64 * smooth;
                    }
                    if self.z_loss != 0.0 {
                        v += zl;
                    }
                    loss[r] = v;
                    let mass = (1.0 - eps) * wy.abs()
                        + eps / cn as f64 * ksum((0..cn).map(|c| w(c).abs()))
                        + (2.0 * self.z_loss * lse).abs();
                    for c in 0..cn {
                        let q = (1.0 - eps) * (c == y) as u8 as f64 + eps / cn as f64;
                        t_abs[c] = p[c] * mass + (w(c) * q).abs();
                    }
                    for c in 0..cn {
                        let mut gc = (1.0 - eps) * wy * (p[c] - (c == y) as u8 as f64);
                        if eps != 0.0 {
                            gc += eps / cn as f64 * (p[c] * wsum - w(c));
                        }
                        if self.z_loss != 0.0 {
                            gc += dz_loss * p[c];
                        }
                        g[c] = gc;
                    }
                } else {
                    let t = self.soft.expect("probability targets");
                    denom_terms.push(1.0);
                    let q: Vec<f64> = (0..cn)
                        .map(|c| t[self.at(n, c, d)] * (1.0 - eps) + eps / cn as f64)
                        .collect();
                    let mut v = -ksum((0..cn).map(|c| l[c] * q[c] * w(c)));
                    if self.z_loss != 0.0 {
                        v += zl;
                    }
                    loss[r] = v;
                    let wq = ksum((0..cn).map(|c| w(c) * q[c]));
                    let mass = ksum((0..cn).map(|c| (w(c) * q[c]).abs()))
                        + (2.0 * self.z_loss * lse).abs();
                    for c in 0..cn {
                        t_abs[c] = p[c] * mass + (w(c) * q[c]).abs();
                    }
                    for c in 0..cn {
                        let mut gc = p[c] * wq - w(c) * q[c];
                        if self.z_loss != 0.0 {
                            gc += dz_loss * p[c];
                        }
                        g[c] = gc;
                    }
                }
                for c in 0..cn {
                    dloss[self.at(n, c, d)] = g[c] * dz[c];
                    terms[self.at(n, c, d)] = t_abs[c];
                }
            }
        }
        CeOut {
            loss,
            // Compensated too: thousands of fractional class weights summed in a plain loop
            // would put the reference's own rounding into the mean's bound.
            denom: ksum(denom_terms),
            dloss,
            terms,
        }
    }
}

/// Binary cross-entropy on logits: per element loss and `d loss / d x`.
/// `y` already smoothed and `y_c` its complement `1 - y` (formed without cancellation); `pw` and `w` already broadcast to the logits' shape.
/// Also returns per element the size of the two terms the gradient is a difference of,
/// `|w| ((1 - y) sigmoid(x) + pw y sigmoid(-x))`.
pub fn bce(
    x: &[f64],
    y: &[f64],
    y_c: &[f64],
    pw: Option<&[f64]>,
    w: Option<&[f64]>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut loss = Vec::with_capacity(x.len());
    let mut grad = Vec::with_capacity(x.len());
    let mut mass = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let (xi, yi, yci) = (x[i], y[i], y_c[i]);
        let pwi = pw.map_or(1.0, |p| p[i]);
        let wi = w.map_or(1.0, |w| w[i]);
        // sigmoid(x) without overflow.
        let sig = if xi >= 0.0 {
            1.0 / (1.0 + (-xi).exp())
        } else {
            let e = xi.exp();
            e / (1.0 + e)
        };
        let coef = 1.0 + (pwi - 1.0) * yi;
        // (1 - y) x + coef softplus(-x), with softplus(-x) = relu(-x) + log1p(exp(-|x|)) and the
        // x relu(-x) parts combined so that nothing cancels at large |x|.
        let l = (-xi.abs()).exp().ln_1p();
        loss.push(wi * (yci * xi.max(0.0) + pwi * yi * (-xi).max(0.0) + coef * l));
        let sig_neg = if xi >= 0.0 {
            let e = (-xi).exp();
            e / (1.0 + e)
        } else {
            1.0 / (1.0 + xi.exp())
        };
        // coef sigmoid(x) - pw y = (1 - y) sigmoid(x) - pw y sigmoid(-x).
        grad.push(wi * (yci * sig - pwi * yi * sig_neg));
        mass.push(wi.abs() * (yci * sig + pwi * yi * sig_neg));
    }
    (loss, grad, mass)
}
