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
        let rows = train.len() / features.max(1);
        RidgeProblem::in_form(train, features, rows <= features)
    }

    /// [`RidgeProblem::new`] in the form chosen by `dual` (the tests solve one problem both ways).
    fn in_form(train: &[f32], features: usize, dual: bool) -> Result<RidgeProblem> {
        ensure!(
            features > 0 && train.len().is_multiple_of(features),
            "ridge: {} training values do not form rows of {features} features",
            train.len()
        );
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
        let gram = if dual { matmul(&x, false, &x, true, rows, features, rows) } else { matmul(&x, true, &x, false, features, rows, features) };
        Ok(RidgeProblem { rows, features, mean, scale, x, gram, dual })
    }

    pub fn features(&self) -> usize {
        self.features
    }

    /// The Gram matrix's trace over its side (in the smaller form, the mean of its at most min(rows, features)
    /// non-zero eigenvalues): the scale of λ at which shrinkage becomes strong, so a relative penalty means
    /// about the same for any data size.
    pub fn penalty_unit(&self) -> f64 {
        let m = if self.dual { self.rows } else { self.features };
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
    pub score: &'a Score<'a>,
}

/// A score of predictions against true values, higher is better.
pub type Score<'a> = dyn Fn(&[f32], &[f32]) -> Result<f64> + 'a;

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

    /// Rows of a standard normal-ish design, reproducible.
    fn design(rows: usize, features: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * features).map(|_| rng.random_range(-1.0f32..1.0) * 3.0 + 0.5).collect()
    }

    /// `x · w + b` in f64, rounded to f32: targets that are exactly linear in the features.
    fn linear_targets(x: &[f32], features: usize, w: &[f64], b: &[f64]) -> Vec<f32> {
        let k = b.len();
        x.chunks_exact(features)
            .flat_map(|row| (0..k).map(move |o| (b[o] + row.iter().enumerate().map(|(f, v)| *v as f64 * w[f * k + o]).sum::<f64>()) as f32))
            .collect()
    }

    #[test]
    fn targets_linear_in_the_features_are_recovered_on_new_rows() {
        let (rows, features, k) = (300, 12, 3);
        let x = design(rows, features, 1);
        let w: Vec<f64> = (0..features * k).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
        let b = [1.5, -2.0, 0.25];
        let y = linear_targets(&x, features, &w, &b);
        let problem = RidgeProblem::new(&x, features).unwrap();
        assert!(!problem.dual, "300 rows of 12 features solve in the primal form");
        // λ = 1e-9 of the mean eigenvalue: the shrinkage of each weight is about λ / eigenvalue ~ 1e-9, far
        // below the f32 rounding (~1e-7 relative) of the inputs and targets.
        let model = problem.solver(1e-9 * problem.penalty_unit()).unwrap().fit(&y, k).unwrap();
        let new_rows = design(50, features, 2);
        let want = linear_targets(&new_rows, features, &w, &b);
        let got = model.predict(&new_rows).unwrap();
        let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        // Bound: the f32 rounding of features, targets and predictions (6e-8 relative each) amplified by the
        // design's condition number (a few, for these uniform features); measured 3.4e-8 of the scale.
        assert!(worst <= 1e-6 * scale, "worst error {worst} on targets up to {scale}");
    }

    #[test]
    fn the_dual_and_primal_forms_give_the_same_model() {
        let (rows, features, k) = (40, 25, 2);
        let x = design(rows, features, 3);
        let y: Vec<f32> = design(rows, k, 4);
        let queries = design(7, features, 5);
        let primal = RidgeProblem::in_form(&x, features, false).unwrap();
        let dual = RidgeProblem::in_form(&x, features, true).unwrap();
        for relative in [1e-3, 1.0, 100.0] {
            // The same absolute λ in both (the units differ: traces over different sides).
            let lambda = relative * primal.penalty_unit();
            let a = primal.solver(lambda).unwrap().fit(&y, k).unwrap().predict(&queries).unwrap();
            let b = dual.solver(lambda).unwrap().fit(&y, k).unwrap().predict(&queries).unwrap();
            let scale = a.iter().map(|v| v.abs()).fold(0f32, f32::max);
            let worst = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            // Both solve in f64 (agreeing to ~1e-12) and round to f32: they differ by an f32 ulp at most
            // (measured: not at all).
            assert!(worst <= 1e-6 * scale, "λ {lambda}: primal and dual predictions differ by {worst} (scale {scale})");
        }
    }

    #[test]
    fn the_penalty_is_chosen_by_the_validation_score() {
        use rand::{Rng, SeedableRng};
        // Few noisy rows of many features: the least-squares fit overfits, so a middle penalty wins on val.
        let (rows, features) = (60, 40);
        let w: Vec<f64> = (0..features).map(|i| if i < 4 { 1.0 } else { 0.0 }).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut noisy =
            |x: &[f32]| -> Vec<f32> { linear_targets(x, features, &w, &[0.0]).into_iter().map(|v| v + rng.random_range(-4.0f32..4.0)).collect() };
        let (x, val_x) = (design(rows, features, 6), design(200, features, 7));
        let (y, val_y) = (noisy(&x), noisy(&val_x));
        let problem = RidgeProblem::new(&x, features).unwrap();
        let neg_mse =
            |p: &[f32], t: &[f32]| -> Result<f64> { Ok(-p.iter().zip(t).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / t.len() as f64) };
        let grid = default_penalty_grid();
        let [chosen]: [Selected; 1] =
            fit_selected(&problem, &val_x, &[Targets { train: &y, val: &val_y, outputs: 1, score: &neg_mse }], &grid).unwrap().try_into().unwrap();
        assert_eq!(chosen.scores.len(), grid.len());
        let best = chosen.scores.iter().map(|(_, s)| *s).fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(chosen.val_score, best, "the chosen penalty is the best on val: {:?}", chosen.scores);
        assert!(
            chosen.relative_penalty > grid[0] && chosen.relative_penalty < grid[grid.len() - 1],
            "noisy targets choose a middle penalty: {:?}",
            chosen.scores
        );
        assert_eq!(chosen.model.penalty, chosen.relative_penalty * problem.penalty_unit());
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
