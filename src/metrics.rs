//! Evaluation metrics with their usual definitions: N-way zero-shot retrieval top-k by cosine similarity,
//! N-way matching and mean correlation of maps (structure maps, pixels) by Pearson correlation, PixCorr,
//! SSIM (grayscale, Gaussian window, as scikit-image computes it), 2-way identification, and the
//! derangements that build shuffled controls, so chance is measured rather than assumed; and the
//! reconstruction metrics of images against the seen ones ([`recon_metrics`]). `sgdm eval` ([`crate::evaluate`])
//! applies them.

use anyhow::{ensure, Result};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn rows(what: &str, data: &[f32], dim: usize) -> Result<usize> {
    ensure!(dim > 0 && data.len().is_multiple_of(dim), "{what}: {} values do not form rows of {dim}", data.len());
    Ok(data.len() / dim)
}

fn normalized(v: &[f32]) -> Vec<f64> {
    let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
    v.iter().map(|x| *x as f64 / norm).collect()
}

/// For each k in `ks`: the fraction of queries whose own key (same row) is among the k keys most
/// cosine-similar to it. `queries` and `keys` are `[n, dim]`, row i of each describing item i. Ties count
/// against the query (a key scoring equal to the true one ranks ahead of it).
pub fn retrieval_top_k(queries: &[f32], keys: &[f32], dim: usize, ks: &[usize]) -> Result<Vec<f64>> {
    let n = paired_rows("retrieval", queries, keys, dim)?;
    Ok(top_k_hits(&queries.chunks_exact(dim).map(normalized).collect::<Vec<_>>(), &keys.chunks_exact(dim).map(normalized).collect::<Vec<_>>(), ks, n))
}

/// N-way matching by Pearson correlation: for each k in `ks`, the fraction of predicted rows whose own true
/// row (same index) is among the k true rows most correlated with it (ties count against the prediction).
/// `predicted` and `truth` are `[n, dim]`; a constant row correlates 0 with everything.
pub fn correlation_top_k(predicted: &[f32], truth: &[f32], dim: usize, ks: &[usize]) -> Result<Vec<f64>> {
    let n = paired_rows("correlation matching", predicted, truth, dim)?;
    let standardized = |v: &[f32]| normalized_f64(&centred(v));
    Ok(top_k_hits(
        &predicted.chunks_exact(dim).map(standardized).collect::<Vec<_>>(),
        &truth.chunks_exact(dim).map(standardized).collect::<Vec<_>>(),
        ks,
        n,
    ))
}

/// The mean over rows of the Pearson correlation of `predicted` row i with `truth` row i (`[n, dim]` each).
pub fn mean_row_correlation(predicted: &[f32], truth: &[f32], dim: usize) -> Result<f64> {
    let n = paired_rows("correlation", predicted, truth, dim)?;
    Ok(predicted.chunks_exact(dim).zip(truth.chunks_exact(dim)).map(|(p, t)| pearson(p, t)).sum::<f64>() / n as f64)
}

/// The mean Pearson correlation between distinct rows of `maps` `[n, dim]` (n >= 2): how alike a set of
/// maps is, whatever they are compared with.
pub fn mean_pairwise_correlation(maps: &[f32], dim: usize) -> Result<f64> {
    let n = rows("pairwise correlation", maps, dim)?;
    ensure!(n >= 2, "pairwise correlation needs at least 2 rows, got {n}");
    let z: Vec<Vec<f64>> = maps.chunks_exact(dim).map(|v| normalized_f64(&centred(v))).collect();
    let mut sum = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            sum += z[i].iter().zip(&z[j]).map(|(a, b)| a * b).sum::<f64>();
        }
    }
    Ok(sum / (n * (n - 1) / 2) as f64)
}

fn paired_rows(what: &str, queries: &[f32], keys: &[f32], dim: usize) -> Result<usize> {
    let n = rows(&format!("{what} queries"), queries, dim)?;
    ensure!(rows(&format!("{what} keys"), keys, dim)? == n, "{what}: {n} queries but {} keys", keys.len() / dim);
    ensure!(n > 0, "{what}: no items");
    Ok(n)
}

fn centred(v: &[f32]) -> Vec<f64> {
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
    v.iter().map(|x| *x as f64 - mean).collect()
}

fn normalized_f64(v: &[f64]) -> Vec<f64> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 1e-12 {
        v.iter().map(|x| x / norm).collect()
    } else {
        vec![0.0; v.len()]
    }
}

/// For each k: the fraction of queries `q[i]` whose key `k[i]` ranks in the top k by dot product (ties
/// against the query).
fn top_k_hits(q: &[Vec<f64>], k: &[Vec<f64>], ks: &[usize], n: usize) -> Vec<f64> {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut hits = vec![0usize; ks.len()];
    for (i, qi) in q.iter().enumerate() {
        let own = dot(qi, &k[i]);
        let rank = k.iter().enumerate().filter(|(j, kj)| *j != i && dot(qi, kj) >= own).count();
        for (h, &top) in hits.iter_mut().zip(ks) {
            *h += (rank < top) as usize;
        }
    }
    hits.iter().map(|&h| h as f64 / n as f64).collect()
}

/// Pearson correlation of two equally long vectors (0 when either is constant).
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().map(|x| *x as f64).sum::<f64>() / n, b.iter().map(|x| *x as f64).sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (*x as f64 - ma, *y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        0.0
    } else {
        sab / (saa * sbb).sqrt()
    }
}

/// PixCorr: the Pearson correlation of all pixels of a reconstruction and its seen image.
pub fn pixcorr(reconstruction: &[f32], seen: &[f32]) -> Result<f64> {
    ensure!(reconstruction.len() == seen.len(), "PixCorr: {} pixels vs {}", reconstruction.len(), seen.len());
    Ok(pearson(reconstruction, seen))
}

/// Gaussian weights of scikit-image's SSIM: σ = 1.5, truncated at 3.5σ (an 11-tap window), normalised.
fn gaussian_window() -> Vec<f64> {
    let sigma = 1.5f64;
    let radius = (3.5 * sigma + 0.5) as i64;
    let w: Vec<f64> = (-radius..=radius).map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp()).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|x| x / sum).collect()
}

/// Separable Gaussian filter evaluated only where the window fits inside the image (the region SSIM
/// averages over), so the border mode never matters. Returns `(h - 2r) x (w - 2r)` values.
fn filter_valid(img: &[f64], w: usize, h: usize, win: &[f64]) -> Vec<f64> {
    let r = win.len() / 2;
    let (vw, vh) = (w - 2 * r, h - 2 * r);
    let mut horizontal = vec![0f64; h * vw];
    for y in 0..h {
        for x in 0..vw {
            horizontal[y * vw + x] = win.iter().enumerate().map(|(i, c)| c * img[y * w + x + i]).sum();
        }
    }
    let mut out = vec![0f64; vh * vw];
    for y in 0..vh {
        for x in 0..vw {
            out[y * vw + x] = win.iter().enumerate().map(|(i, c)| c * horizontal[(y + i) * vw + x]).sum();
        }
    }
    out
}

/// SSIM of two grayscale images `[height, width]` with values in a range of `data_range`, as
/// `skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
/// use_sample_covariance=False, data_range=data_range)` computes it (K1 = 0.01, K2 = 0.03).
pub fn ssim(a: &[f32], b: &[f32], width: usize, height: usize, data_range: f64) -> Result<f64> {
    ensure!(a.len() == width * height && b.len() == a.len(), "SSIM: images of {} and {} pixels for {width}x{height}", a.len(), b.len());
    let win = gaussian_window();
    ensure!(width >= win.len() && height >= win.len(), "SSIM: images must be at least {0}x{0}, got {width}x{height}", win.len());
    let a: Vec<f64> = a.iter().map(|x| *x as f64).collect();
    let b: Vec<f64> = b.iter().map(|x| *x as f64).collect();
    let prod = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).collect::<Vec<f64>>();
    let f = |img: &[f64]| filter_valid(img, width, height, &win);
    let (ux, uy, uxx, uyy, uxy) = (f(&a), f(&b), f(&prod(&a, &a)), f(&prod(&b, &b)), f(&prod(&a, &b)));
    let (c1, c2) = ((0.01 * data_range).powi(2), (0.03 * data_range).powi(2));
    let mut total = 0.0;
    for i in 0..ux.len() {
        let (vx, vy, vxy) = (uxx[i] - ux[i] * ux[i], uyy[i] - uy[i] * uy[i], uxy[i] - ux[i] * uy[i]);
        total += ((2.0 * ux[i] * uy[i] + c1) * (2.0 * vxy + c2)) / ((ux[i].powi(2) + uy[i].powi(2) + c1) * (vx + vy + c2));
    }
    Ok(total / ux.len() as f64)
}

/// 2-way identification: over all pairs (i, j ≠ i), the fraction in which reconstruction i's features
/// correlate more with seen image i's features than with seen image j's. Chance is 0.5.
pub fn two_way_identification(reconstructed: &[f32], seen: &[f32], dim: usize) -> Result<f64> {
    let n = rows("2-way identification reconstructions", reconstructed, dim)?;
    ensure!(rows("2-way identification seen", seen, dim)? == n, "2-way identification: {n} reconstructions but {} seen images", seen.len() / dim);
    ensure!(n >= 2, "2-way identification needs at least 2 items");
    let (mut wins, mut pairs) = (0usize, 0usize);
    for (i, r) in reconstructed.chunks_exact(dim).enumerate() {
        let own = pearson(r, &seen[i * dim..(i + 1) * dim]);
        for (j, s) in seen.chunks_exact(dim).enumerate() {
            if j != i {
                wins += (own > pearson(r, s)) as usize;
                pairs += 1;
            }
        }
    }
    Ok(wins as f64 / pairs as f64)
}

/// A random permutation of `0..n` with no fixed point (n ≥ 2), reproducible from `seed`: applied to EEG rows,
/// it pairs every EEG trial with another item's image, the shuffled control.
pub fn derangement(n: usize, seed: u64) -> Vec<usize> {
    assert!(n >= 2, "a derangement needs at least 2 items");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut p: Vec<usize> = (0..n).collect();
    loop {
        p.shuffle(&mut rng);
        if p.iter().enumerate().all(|(i, &x)| i != x) {
            return p;
        }
    }
}

/// The reconstruction metrics of one pairing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconMetrics {
    pub pixcorr: f64,
    pub ssim: f64,
    pub two_way: f64,
}

/// skimage.color.rgb2gray: 0.2125 R + 0.7154 G + 0.0721 B.
fn gray(rgb: &RgbImage) -> Vec<f32> {
    rgb.pixels().map(|p| (0.2125 * p[0] as f32 + 0.7154 * p[1] as f32 + 0.0721 * p[2] as f32) / 255.0).collect()
}

pub fn unit(rgb: &RgbImage) -> Vec<f32> {
    rgb.as_raw().iter().map(|v| *v as f32 / 255.0).collect()
}

/// Reconstruction metrics of reconstructions `recon[i]` against seen images `seen[pair[i]]`.
pub fn recon_metrics(
    recon: &[RgbImage],
    seen: &[RgbImage],
    recon_latents: &[f32],
    seen_latents: &[f32],
    dim: usize,
    pair: &[usize],
) -> Result<ReconMetrics> {
    let n = recon.len();
    let (mut pc, mut ss) = (0.0, 0.0);
    for (i, r) in recon.iter().enumerate() {
        let s = &seen[pair[i]];
        pc += pixcorr(&unit(r), &unit(s))?;
        ss += ssim(&gray(r), &gray(s), r.width() as usize, r.height() as usize, 1.0)?;
    }
    let paired: Vec<f32> = pair.iter().flat_map(|&j| seen_latents[j * dim..(j + 1) * dim].iter().copied()).collect();
    Ok(ReconMetrics { pixcorr: pc / n as f64, ssim: ss / n as f64, two_way: two_way_identification(recon_latents, &paired, dim)? })
}
