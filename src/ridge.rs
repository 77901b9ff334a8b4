//! Ridge regression, the linear floor a deep EEG decoder has to beat: each feature standardised with the
//! training rows' mean and standard deviation, the targets centred on their training mean, weights
//! `W = argmin |X W - Y|² + λ |W|²`. The penalty is chosen on a validation set by the caller's score
//! ([`fit_selected`]), so the rows a model is finally scored on never take part in fitting or selection.
//!
//! Solved in f64 in whichever form is smaller: primal `(XᵀX + λI) W = XᵀY` when there are fewer features
//! than rows, dual `(XXᵀ + λI) A = Y, W = XᵀA` otherwise (the two give the same W); one Cholesky
//! factorisation per penalty serves every target column.

use anyhow::{ensure, Context, Result};

/// Row-major f64 GEMM: `c = a · b` with `a` `[m, k]` (or its transpose, stored `[k, m]`) and `b` `[k, n]`
/// (or its transpose, stored `[n, k]`).
fn matmul(a: &[f64], a_transposed: bool, b: &[f64], b_transposed: bool, m: usize, k: usize, n: usize) -> Vec<f64> {
    assert!(a.len() == m * k && b.len() == k * n, "matmul: operands of {} and {} values for [{m}, {k}] x [{k}, {n}]", a.len(), b.len());
    let mut c = vec![0f64; m * n];
    if m == 0 || n == 0 || k == 0 {
        return c;
    }
    let (rsa, csa) = if a_transposed { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if b_transposed { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the strides above address exactly the asserted lengths of `a` and `b`, and `c` holds m·n.
    unsafe { matrixmultiply::dgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, 0.0, c.as_mut_ptr(), n as isize, 1) };
    c
}

/// The lower Cholesky factor of the symmetric positive definite `[m, m]` matrix `a`, row-major.
fn cholesky(a: &[f64], m: usize) -> Result<Vec<f64>> {
    let mut l = vec![0f64; m * m];
    for i in 0..m {
        for j in 0..=i {
            let dot: f64 = l[i * m..i * m + j].iter().zip(&l[j * m..j * m + j]).map(|(x, y)| x * y).sum();
            let s = a[i * m + j] - dot;
            if i == j {
                ensure!(s > 0.0 && s.is_finite(), "ridge: the regularised Gram matrix is not positive definite at row {i} (pivot {s:e})");
                l[i * m + i] = s.sqrt();
            } else {
                l[i * m + j] = s / l[j * m + j];
            }
        }
    }
    Ok(l)
}

/// Solves `L Lᵀ x = b` in place for one right-hand side `b` of length m.
fn cholesky_solve(l: &[f64], m: usize, b: &mut [f64]) {
    for i in 0..m {
        let dot: f64 = l[i * m..i * m + i].iter().zip(&b[..i]).map(|(x, y)| x * y).sum();
        b[i] = (b[i] - dot) / l[i * m + i];
    }
    for i in (0..m).rev() {
        let dot: f64 = (i + 1..m).map(|k| l[k * m + i] * b[k]).sum();
        b[i] = (b[i] - dot) / l[i * m + i];
    }
}

/// The training rows of a ridge problem, standardised, with their Gram matrix in the smaller form.
pub struct RidgeProblem {
    rows: usize,
    features: usize,
    mean: Vec<f64>,
    scale: Vec<f64>,
    /// Standardised training rows `[rows, features]`.
    x: Vec<f64>,
    /// `XXᵀ` `[rows, rows]` (dual) or `XᵀX` `[features, features]` (primal).
    gram: Vec<f64>,
    dual: bool,
}

/// A fitted linear map: `predict(x) = ((x - mean) / scale) · W + intercept`.
#[derive(Debug, Clone)]
pub struct RidgeModel {
    /// The absolute penalty λ it was fitted with.
    pub penalty: f64,
    mean: Vec<f64>,
    scale: Vec<f64>,
    /// `[features, outputs]`.
    weights: Vec<f64>,
    intercept: Vec<f64>,
}

impl RidgeProblem {
    /// The problem of `train` `[rows, features]` (row-major). A feature constant over the rows is kept with
    /// scale 1, so it contributes nothing.
    pub fn new(train: &[f32], features: usize) -> Result<RidgeProblem> {
        ensure!(features > 0 && train.len().is_multiple_of(features), "ridge: {} training values do not form rows of {features} features", train.len());
        let rows = train.len() / features;
        ensure!(rows >= 2, "ridge: {rows} training row(s); at least 2 are needed");
        ensure!(train.iter().all(|v| v.is_finite()), "ridge: the training features hold NaN or Inf");
        let mut mean = vec![0f64; features];
        for row in train.chunks_exact(features) {
            mean.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64);
        }
        mean.iter_mut().for_each(|m| *m /= rows as f64);
        let mut var = vec![0f64; features];
        for row in train.chunks_exact(features) {
            var.iter_mut().zip(row).zip(&mean).for_each(|((s, v), m)| *s += (*v as f64 - m).powi(2));
        }
        let scale: Vec<f64> = var.iter().map(|s| (s / rows as f64).sqrt()).map(|s| if s > 1e-12 { s } else { 1.0 }).collect();
        let x: Vec<f64> = train.chunks_exact(features).flat_map(|row| standardised(row, &mean, &scale)).collect();
        let dual = rows <= features;
        let gram = if dual { matmul(&x, false, &x, true, rows, features, rows) } else { matmul(&x, true, &x, false, features, rows, features) };
        Ok(RidgeProblem { rows, features, mean, scale, x, gram, dual })
    }

    pub fn features(&self) -> usize {
        self.features
    }

    /// The mean non-zero eigenvalue of the Gram matrix (its trace over min(rows, features)): the scale of
    /// λ at which shrinkage becomes strong, so a relative penalty means the same for any data size.
    pub fn penalty_unit(&self) -> f64 {
        let m = self.rows.min(self.features);
        (0..m).map(|i| self.gram[i * m + i]).sum::<f64>() / m as f64
    }

    /// Factorises the problem for penalty λ (absolute, > 0).
    pub fn solver(&self, penalty: f64) -> Result<RidgeSolver<'_>> {
        ensure!(penalty > 0.0 && penalty.is_finite(), "ridge: the penalty must be a positive number, got {penalty}");
        let m = if self.dual { self.rows } else { self.features };
        let mut a = self.gram.clone();
        (0..m).for_each(|i| a[i * m + i] += penalty);
        Ok(RidgeSolver { problem: self, penalty, factor: cholesky(&a, m).with_context(|| format!("ridge: penalty {penalty:e}"))? })
    }
}

fn standardised<'a>(row: &'a [f32], mean: &'a [f64], scale: &'a [f64]) -> impl Iterator<Item = f64> + 'a {
    row.iter().zip(mean).zip(scale).map(|((v, m), s)| (*v as f64 - m) / s)
}

/// A [`RidgeProblem`] factorised for one penalty.
pub struct RidgeSolver<'a> {
    problem: &'a RidgeProblem,
    penalty: f64,
    factor: Vec<f64>,
}

impl RidgeSolver<'_> {
    /// The model predicting `targets` `[rows, outputs]` (one row per training row).
    pub fn fit(&self, targets: &[f32], outputs: usize) -> Result<RidgeModel> {
        let p = self.problem;
        ensure!(outputs > 0 && targets.len() == p.rows * outputs, "ridge: {} target values for {} rows of {outputs}", targets.len(), p.rows);
        ensure!(targets.iter().all(|v| v.is_finite()), "ridge: the training targets hold NaN or Inf");
        let mut intercept = vec![0f64; outputs];
        for row in targets.chunks_exact(outputs) {
            intercept.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64);
        }
        intercept.iter_mut().for_each(|m| *m /= p.rows as f64);
        // Centred targets, transposed to [outputs, rows] so each column solves contiguously.
        let mut yt = vec![0f64; outputs * p.rows];
        for (r, row) in targets.chunks_exact(outputs).enumerate() {
            for (o, v) in row.iter().enumerate() {
                yt[o * p.rows + r] = *v as f64 - intercept[o];
            }
        }
        let weights = if p.dual {
            // A = (XXᵀ + λI)⁻¹ Y, W = Xᵀ A.
            for column in yt.chunks_exact_mut(p.rows) {
                cholesky_solve(&self.factor, p.rows, column);
            }
            matmul(&p.x, true, &yt, true, p.features, p.rows, outputs)
        } else {
            // W = (XᵀX + λI)⁻¹ Xᵀ Y, column by column.
            let mut xty = matmul(&yt, false, &p.x, false, outputs, p.rows, p.features);
            for column in xty.chunks_exact_mut(p.features) {
                cholesky_solve(&self.factor, p.features, column);
            }
            let mut w = vec![0f64; p.features * outputs];
            for (o, column) in xty.chunks_exact(p.features).enumerate() {
                column.iter().enumerate().for_each(|(f, v)| w[f * outputs + o] = *v);
            }
            w
        };
        Ok(RidgeModel { penalty: self.penalty, mean: p.mean.clone(), scale: p.scale.clone(), weights, intercept })
    }
}

impl RidgeModel {
    pub fn outputs(&self) -> usize {
        self.intercept.len()
    }

    /// Predictions `[rows, outputs]` for `x` `[rows, features]`.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<f32>> {
        let (d, k) = (self.mean.len(), self.outputs());
        ensure!(x.len().is_multiple_of(d), "ridge: {} values do not form rows of {d} features", x.len());
        let rows = x.len() / d;
        let xs: Vec<f64> = x.chunks_exact(d).flat_map(|row| standardised(row, &self.mean, &self.scale)).collect();
        let y = matmul(&xs, false, &self.weights, false, rows, d, k);
        Ok(y.chunks_exact(k).flat_map(|row| row.iter().zip(&self.intercept).map(|(v, b)| (v + b) as f32)).collect())
    }
}

/// One set of targets to fit, with its validation rows and the score (higher is better) its penalty is
/// chosen by.
pub struct Targets<'a> {
    pub train: &'a [f32],
    pub val: &'a [f32],
    pub outputs: usize,
    /// `score(predicted, true)` over the validation rows, both `[val rows, outputs]`.
    pub score: &'a dyn Fn(&[f32], &[f32]) -> Result<f64>,
}

/// What [`fit_selected`] chose for one set of targets.
#[derive(Debug, Clone)]
pub struct Selected {
    pub model: RidgeModel,
    /// The chosen penalty relative to [`RidgeProblem::penalty_unit`].
    pub relative_penalty: f64,
    /// Its validation score.
    pub val_score: f64,
    /// (relative penalty, validation score) for every penalty tried.
    pub scores: Vec<(f64, f64)>,
}

/// Relative penalties from 10⁻³ to 10³ in half decades.
pub fn default_penalty_grid() -> Vec<f64> {
    (-6..=6).map(|e| 10f64.powf(e as f64 / 2.0)).collect()
}

/// Fits every set of `targets` at every relative penalty of `grid` on the training rows of `problem`,
/// scores each fit on `val` `[val rows, features]` with the set's score, and keeps the best per set (the
/// first of equal scores). Nothing but the training and validation rows is read.
pub fn fit_selected(problem: &RidgeProblem, val: &[f32], targets: &[Targets], grid: &[f64]) -> Result<Vec<Selected>> {
    ensure!(!grid.is_empty(), "ridge: no penalty to try");
    let unit = problem.penalty_unit();
    let mut best: Vec<Option<Selected>> = vec![None; targets.len()];
    for &relative in grid {
        let solver = problem.solver(relative * unit)?;
        for (t, slot) in targets.iter().zip(best.iter_mut()) {
            let model = solver.fit(t.train, t.outputs)?;
            let score = (t.score)(&model.predict(val)?, t.val)?;
            ensure!(score.is_finite(), "ridge: the validation score at relative penalty {relative:e} is {score}");
            *slot = Some(match slot.take() {
                Some(mut s) => {
                    s.scores.push((relative, score));
                    if score > s.val_score {
                        (s.model, s.relative_penalty, s.val_score) = (model, relative, score);
                    }
                    s
                }
                None => Selected { model, relative_penalty: relative, val_score: score, scores: vec![(relative, score)] },
            });
        }
    }
    Ok(best.into_iter().map(|s| s.expect("the grid is not empty")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_small_system() {
        // [[4, 2], [2, 3]] x = [2, 1] -> x = [0.5, 0].
        let l = cholesky(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let mut b = [2.0, 1.0];
        cholesky_solve(&l, 2, &mut b);
        assert!((b[0] - 0.5).abs() < 1e-15 && b[1].abs() < 1e-15, "{b:?}");
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err(), "an indefinite matrix is refused");
    }

    #[test]
    fn matmul_handles_every_transpose() {
        // a = [[1, 2, 3], [4, 5, 6]], b = [[1, 0], [0, 1], [1, 1]]: a·b = [[4, 5], [10, 11]].
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let at = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let bt = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
        let want = vec![4.0, 5.0, 10.0, 11.0];
        assert_eq!(matmul(&a, false, &b, false, 2, 3, 2), want);
        assert_eq!(matmul(&at, true, &b, false, 2, 3, 2), want);
        assert_eq!(matmul(&a, false, &bt, true, 2, 3, 2), want);
        assert_eq!(matmul(&at, true, &bt, true, 2, 3, 2), want);
    }
}
