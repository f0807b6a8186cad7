//! The logits gradient a thread keeps between backward passes (logits of 8 MiB or more on the
//! CPU): each step's gradient is right although the buffer it is written into holds the
//! previous step's, whatever changes between steps (ignored rows, layout, shape, dtype, soft
//! targets), and no gradient already handed out is overwritten by a later step. Values are
//! checked against the independent f64 reference of tests/common/reference.rs within the
//! README's bound.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_xent::{free_grad_buffer, CrossEntropyLoss};
use common::flat_f64;
use common::precision::check;
use common::reference::Ce;
use proptest::prelude::*;

/// One step's problem: logits `(outer, C, inner)` (`inner == 1`: `(outer, C)`), the class of
/// every row (`ignore` where ignored) or probability targets, smoothing `eps`.
#[derive(Debug, Clone)]
struct Step {
    dtype: DType,
    outer: usize,
    classes: usize,
    inner: usize,
    soft: bool,
    /// Every `ignore_every`-th row ignored (0: none).
    ignore_every: usize,
    eps: f64,
    seed: u64,
}

const IGNORE: i64 = -1;

/// A cheap deterministic generator (splitmix64), so that steps differ in every value.
fn values(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

impl Step {
    fn dims(&self) -> Vec<usize> {
        if self.inner == 1 {
            vec![self.outer, self.classes]
        } else {
            vec![self.outer, self.classes, self.inner]
        }
    }

    fn len(&self) -> usize {
        self.outer * self.classes * self.inner
    }

    fn loss(&self) -> CrossEntropyLoss {
        let ce = CrossEntropyLoss::new().label_smoothing(self.eps);
        // PyTorch (and this crate) accept only the default ignore_index with probabilities.
        if self.soft {
            ce
        } else {
            ce.ignore_index(IGNORE)
        }
    }

    /// The logits (rounded to the dtype, as f64 for the reference) and the target.
    fn inputs(&self) -> (Tensor, Vec<f64>, Tensor, Vec<i64>, Vec<f64>) {
        let cpu = &Device::Cpu;
        let x = Tensor::from_vec(values(self.seed, self.len(), 6.0), self.dims(), cpu)
            .unwrap()
            .to_dtype(self.dtype)
            .unwrap();
        let xv = flat_f64(&x);
        let rows = self.outer * self.inner;
        if self.soft {
            // Positive weights normalised per row, stored like the logits.
            let raw = values(self.seed ^ 0x5eed, self.len(), 1.0);
            let mut t = vec![0.0; self.len()];
            for n in 0..self.outer {
                for d in 0..self.inner {
                    let at = |c: usize| (n * self.classes + c) * self.inner + d;
                    let sum: f64 = (0..self.classes).map(|c| raw[at(c)].abs()).sum();
                    for c in 0..self.classes {
                        t[at(c)] = raw[at(c)].abs() / sum;
                    }
                }
            }
            let tt = Tensor::from_vec(t, self.dims(), cpu)
                .unwrap()
                .to_dtype(self.dtype)
                .unwrap();
            let tv = flat_f64(&tt);
            (x, xv, tt, Vec::new(), tv)
        } else {
            let y: Vec<i64> = (0..rows)
                .map(|r| {
                    if self.ignore_every > 0 && r % self.ignore_every == 1 {
                        IGNORE
                    } else {
                        ((r as u64 * 7919 + self.seed) % self.classes as u64) as i64
                    }
                })
                .collect();
            let mut tdims = vec![self.outer];
            if self.inner > 1 {
                tdims.push(self.inner);
            }
            let yt = Tensor::from_vec(y.clone(), tdims, cpu).unwrap();
            (x, xv, yt, y, Vec::new())
        }
    }

    /// The reference gradient of the mean loss, and the scale of its bound.
    fn want(&self, xv: &[f64], y: &[i64], tv: &[f64]) -> (Vec<f64>, f64) {
        let r = Ce {
            x: xv,
            outer: self.outer,
            classes: self.classes,
            inner: self.inner,
            hard: (!self.soft).then_some(y),
            soft: self.soft.then_some(tv),
            eps: self.eps,
            weight: None,
            ignore_index: IGNORE,
            z_loss: 0.0,
            softcap: None,
        }
        .eval();
        let want: Vec<f64> = r.dloss.iter().map(|g| g / r.denom).collect();
        // The README's scale: the largest |gradient| or term a gradient is a difference of.
        let scale = want
            .iter()
            .map(|v| v.abs())
            .chain(r.terms.iter().map(|t| t / r.denom))
            .fold(0f64, f64::max);
        (want, scale)
    }

    /// Runs the step through autograd; checks the gradient against the reference (and that
    /// ignored rows are exactly 0) and returns it.
    fn run_and_check(&self) -> Tensor {
        let (x, xv, t, y, tv) = self.inputs();
        let x = Var::from_tensor(&x).unwrap();
        let loss = self.loss().forward(x.as_tensor(), &t).unwrap();
        let g = loss.backward().unwrap().remove(x.as_tensor()).unwrap();
        assert_eq!(g.dims(), self.dims().as_slice(), "{self:?}");
        assert_eq!(g.dtype(), self.dtype, "{self:?}");
        let got = flat_f64(&g);
        let (want, scale) = self.want(&xv, &y, &tv);
        let (ratio, what) = check(self.dtype, &got, &want, |_| scale, &format!("{self:?}"));
        assert!(ratio <= 1.0, "{ratio:.1}x the bound: {what}");
        for (r, &yr) in y.iter().enumerate() {
            if yr == IGNORE {
                let (n, d) = (r / self.inner, r % self.inner);
                for c in 0..self.classes {
                    let v = got[(n * self.classes + c) * self.inner + d];
                    assert_eq!(v, 0.0, "ignored row {r}, class {c}: {self:?}");
                }
            }
        }
        g
    }
}

/// A step of at least 8 MiB of logits (the kept-buffer path) in `dtype`.
fn big(dtype: DType, seed: u64) -> Step {
    Step {
        dtype,
        outer: 24,
        classes: (9 << 20) / dtype.size_in_bytes() / 24 + 1,
        inner: 1,
        soft: false,
        ignore_every: 0,
        eps: 0.1,
        seed,
    }
}

/// Gradients the crate handed out (through autograd, and from `forward_with_grad`) keep their
/// values while later steps run on the same thread.
#[test]
fn autograd_gradients_stay_intact_across_steps() {
    for dtype in [DType::F32, DType::BF16] {
        let first = big(dtype, 1);
        let g1 = first.run_and_check();
        let kept = flat_f64(&g1);
        let (x, _, t, _, _) = first.inputs();
        let (_, direct) = first.loss().forward_with_grad(&x, &t).unwrap();
        let direct_kept = flat_f64(&direct);
        for seed in 2..4 {
            big(dtype, seed).run_and_check();
        }
        assert!(
            flat_f64(&g1) == kept,
            "{dtype:?}: a later step overwrote the first gradient"
        );
        assert!(
            flat_f64(&direct) == direct_kept,
            "{dtype:?}: a later step overwrote forward_with_grad's gradient"
        );
    }
}

/// One thread, one buffer: every step writes all of it, whatever the previous step left there.
#[test]
fn a_kept_buffer_is_rewritten_everywhere() {
    let dense = big(DType::F32, 10);
    let steps = [
        dense.clone(),
        // Every other row ignored: those rows must be zero, not the last step's values.
        Step {
            ignore_every: 2,
            seed: 11,
            ..dense.clone()
        },
        // The same bytes as (N, C, D): the tiled K-dim path, some positions ignored.
        Step {
            outer: 6,
            inner: 4,
            ignore_every: 3,
            seed: 12,
            ..dense.clone()
        },
        // Probability targets.
        Step {
            soft: true,
            seed: 13,
            ..dense.clone()
        },
        // 70 % of the elements: written into a prefix of the kept buffer.
        Step {
            outer: 17,
            ignore_every: 4,
            seed: 14,
            ..dense.clone()
        },
        // Larger again, then other dtypes: new buffers.
        Step {
            outer: 30,
            seed: 15,
            ..dense.clone()
        },
        big(DType::F64, 16),
        Step {
            ignore_every: 2,
            ..big(DType::BF16, 17)
        },
        Step {
            ignore_every: 3,
            ..big(DType::F16, 18)
        },
        big(DType::F32, 19),
    ];
    for s in &steps {
        s.run_and_check();
    }
    // After the buffer is freed the next step allocates a new one.
    free_grad_buffer();
    big(DType::F32, 20).run_and_check();
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        prop_oneof![
            Just(DType::F32),
            Just(DType::F64),
            Just(DType::BF16),
            Just(DType::F16)
        ],
        1usize..40,
        prop_oneof![Just(1usize), Just(3)],
        any::<bool>(),
        0usize..4,
        prop_oneof![Just(0.0), Just(0.1), Just(1.0)],
        any::<u64>(),
        // Around the 8 MiB threshold: below it (fresh buffers), at it and above.
        prop_oneof![Just(6usize), Just(8), Just(9), Just(13)],
    )
        .prop_map(
            |(dtype, outer, inner, soft, ignore_every, eps, seed, mib)| Step {
                dtype,
                outer,
                classes: ((mib << 20) / dtype.size_in_bytes() / (outer * inner)).max(1),
                inner,
                soft,
                ignore_every,
                eps,
                seed,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5, ..ProptestConfig::default() })]

    /// Random sequences of steps on one thread (each checked against the reference), the
    /// buffer freed before some of them, with the first gradient checked unchanged at the end.
    #[test]
    fn step_sequences_match_the_reference(
        steps in prop::collection::vec(step_strategy(), 2..4),
        frees in prop::collection::vec(any::<bool>(), 4),
    ) {
        let g0 = steps[0].run_and_check();
        let kept = flat_f64(&g0);
        for (s, free) in steps[1..].iter().zip(frees) {
            if free {
                free_grad_buffer();
            }
            s.run_and_check();
        }
        prop_assert!(flat_f64(&g0) == kept);
    }
}
