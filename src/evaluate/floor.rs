//! The linear floor beside the model's numbers: ridge regression ([`crate::ridge`]) from trial-averaged EEG
//! (every repetition of a figure averaged, each channel x time value a feature, standardised with the train
//! split's statistics) to the 16x16 structure targets and to the StructuralVAE's mu of the seen image. It is
//! fitted on the dataset's train split, its penalty chosen on the val split (structure: mean Pearson
//! correlation of the maps; mu: mean cosine similarity, the measure retrieval ranks by), and only then
//! applied to the evaluated split. A deep model that does not beat it has learned nothing a linear read-out
//! of the EEG could not.

use anyhow::{ensure, Context, Result};

use crate::data::dataset::DatasetSplit;
use crate::data::image::{load_square, to_planes};
use crate::metrics::mean_row_correlation;
use crate::pipeline::Pipeline;
use crate::reconstruct::EegItems;
use crate::ridge::{default_penalty_grid, fit_selected, RidgeProblem, Selected, Targets};

/// The two ridge decoders, fitted and selected.
pub struct LinearFloor {
    /// EEG -> structure targets `[E·E]`.
    pub structure: Selected,
    /// EEG -> the StructuralVAE's mu.
    pub mu: Selected,
    /// The train split's mean structure target: the prediction that knows no EEG.
    pub mean_map: Vec<f32>,
    pub train_figures: usize,
    pub val_figures: usize,
}

/// Every figure of a split: EEG averaged over its repetitions `[figures, C·T]`.
pub fn averaged_eeg(split: &DatasetSplit) -> Result<Vec<f32>> {
    let items = EegItems::open(&split.eeg_path())?;
    let rows: Vec<usize> = (0..items.shape()[0]).collect();
    ensure!(
        rows.len() == split.split.figures,
        "{}: {} rows, the manifest lists {} figures",
        split.eeg_path().display(),
        rows.len(),
        split.split.figures
    );
    items.read(&rows)
}

/// The StructuralVAE's mu `[figures, latent]` of a split's images.
fn image_mu(pipeline: &Pipeline, split: &DatasetSplit) -> Result<Vec<f32>> {
    let size = pipeline.structural_vae_image_size() as u32;
    let mut mu = Vec::new();
    for chunk in split.image_paths().chunks(64) {
        let planes: Vec<f32> = chunk.iter().map(|p| load_square(p, size).map(|im| to_planes(&im))).collect::<Result<Vec<_>>>()?.concat();
        mu.extend(pipeline.image_embedding(&planes)?);
    }
    Ok(mu)
}

fn mean_cosine(predicted: &[f32], truth: &[f32], dim: usize) -> Result<f64> {
    ensure!(predicted.len() == truth.len() && !truth.is_empty(), "cosine: {} predicted values for {} true ones", predicted.len(), truth.len());
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b)).max(1e-12)
    };
    Ok(predicted.chunks_exact(dim).zip(truth.chunks_exact(dim)).map(|(a, b)| cosine(a, b)).sum::<f64>() / (truth.len() / dim) as f64)
}

/// Fits the floor for `evaluated`, a split of a dataset that has train and val splits. Reads the train and
/// val splits only: the evaluated split must be neither (its rows would take part in fitting or selection).
pub fn fit_linear_floor(pipeline: &Pipeline, evaluated: &DatasetSplit) -> Result<LinearFloor> {
    let name = &evaluated.split.name;
    ensure!(
        name != "train" && name != "val",
        "{}: the linear floor is fitted on the train split and selected on the val split, so it cannot score the '{name}' split",
        evaluated.eeg_path().display()
    );
    let (train, val) = (evaluated.sibling("train")?, evaluated.sibling("val")?);
    let e2 = pipeline.edge * pipeline.edge;
    ensure!(
        evaluated.manifest.edge_size * evaluated.manifest.edge_size == e2,
        "{}: structure targets of {1}x{1}, the model's structure maps are {2}x{2}",
        evaluated.dir.display(),
        evaluated.manifest.edge_size,
        pipeline.edge
    );
    let (train_x, val_x) = (averaged_eeg(&train)?, averaged_eeg(&val)?);
    let features = train_x.len() / train.split.figures;
    let (train_maps, val_maps) = (train.structure_targets()?, val.structure_targets()?);
    let (train_mu, val_mu) = (image_mu(pipeline, &train)?, image_mu(pipeline, &val)?);
    let latent = train_mu.len() / train.split.figures;
    let problem =
        RidgeProblem::new(&train_x, features).with_context(|| format!("{}: the linear floor's training rows", train.eeg_path().display()))?;
    let structure_score = |p: &[f32], t: &[f32]| mean_row_correlation(p, t, e2);
    let mu_score = |p: &[f32], t: &[f32]| mean_cosine(p, t, latent);
    let targets = [
        Targets { train: &train_maps, val: &val_maps, outputs: e2, score: &structure_score },
        Targets { train: &train_mu, val: &val_mu, outputs: latent, score: &mu_score },
    ];
    let [structure, mu]: [Selected; 2] = fit_selected(&problem, &val_x, &targets, &default_penalty_grid())?.try_into().expect("two target sets");
    let mut mean_map = vec![0f32; e2];
    for row in train_maps.chunks_exact(e2) {
        mean_map.iter_mut().zip(row).for_each(|(m, v)| *m += v / train.split.figures as f32);
    }
    Ok(LinearFloor { structure, mu, mean_map, train_figures: train.split.figures, val_figures: val.split.figures })
}
