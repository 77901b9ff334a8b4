//! The simulated observer: 17 posterior electrodes, what part of the visual field each one sees, the
//! visual evoked components a figure drives there, and the background EEG a trial is buried in.
//! docs/synth.md gives the equations and the physiology behind each number.

use std::sync::OnceLock;

use super::tangram::{Figure, Rendering, EDGE_SIZE, IMAGE_SIZE};
use super::Rng;
use crate::data::structure::block_mean;

/// THINGS-EEG2's channels, in its order.
pub const CHANNELS: [&str; 17] = ["P7", "P5", "P3", "P1", "Pz", "P2", "P4", "P6", "P8", "PO7", "PO3", "POz", "PO4", "PO8", "O1", "Oz", "O2"];
pub const SAMPLING_RATE_HZ: f64 = 100.0;
/// Samples per trial: -0.2 s to 0.79 s.
pub const SAMPLES: usize = 100;
/// Samples before stimulus onset.
const BASELINE: usize = 20;

const C: usize = CHANNELS.len();

/// Flat scalp positions (x to the right ear, y towards the nose; head radius 1), from the 10-10 layout.
const POSITIONS: [(f64, f64); C] = [
    (-0.72, -0.52),
    (-0.54, -0.56),
    (-0.36, -0.59),
    (-0.18, -0.61),
    (0.0, -0.62),
    (0.18, -0.61),
    (0.36, -0.59),
    (0.54, -0.56),
    (0.72, -0.52),
    (-0.58, -0.78),
    (-0.29, -0.81),
    (0.0, -0.82),
    (0.29, -0.81),
    (0.58, -0.78),
    (-0.31, -0.95),
    (0.0, -1.0),
    (0.31, -0.95),
];

/// Fixed seed of the observer: the same "brain" under every dataset seed, so data sets generated with
/// different seeds come from one subject.
const BRAIN_SEED: u64 = 0x5EED_B4A1;
/// Figures the feature normalisation is estimated on.
const REFERENCE_FIGURES: usize = 96;
/// Side of the grid the visual field is sampled on for the electrode features.
const FIELD: usize = 32;
/// Side of the DCT block of shape descriptors (all but the DC term are used).
const DCT: usize = 5;
/// Shape descriptors: DCT coefficients, area and edge length.
const DESCRIPTORS: usize = DCT * DCT - 1 + 2;
/// Cortical sources of the late component per sub-component.
const LATE_SOURCES: usize = 6;

/// Evoked components: (name, peak latency s, width s). The late ones carry shape identity.
const COMPONENTS: [(&str, f64, f64); 6] =
    [("C1", 0.080, 0.012), ("P1", 0.105, 0.016), ("N1", 0.170, 0.022), ("P3a", 0.250, 0.035), ("P3b", 0.330, 0.050), ("SW", 0.450, 0.080)];
const EARLY: usize = 3;

// Nominal amplitudes, microvolts.
const C1_UV: f64 = 2.5;
const P1_UV: f64 = 5.0;
const N1_UV: f64 = -7.0;
const LATE_COMMON_UV: f64 = 2.0;
const LATE_IDENTITY_UV: f64 = 3.0;
const PINK_UV: f64 = 7.0;
const ALPHA_UV: f64 = 4.0;
const SENSOR_UV: f64 = 1.0;

// Trial-to-trial variability.
const EARLY_LATENCY_JITTER_S: f64 = 0.008;
const LATE_LATENCY_JITTER_S: f64 = 0.025;
const EARLY_GAIN_JITTER: f64 = 0.2;
const LATE_GAIN_JITTER: f64 = 0.3;

/// Sample times in seconds: -0.20, -0.19, ..., 0.79.
pub fn times() -> Vec<f32> {
    (0..SAMPLES).map(|i| ((i as f64 - BASELINE as f64) / SAMPLING_RATE_HZ) as f32).collect()
}

/// A figure's evoked response before trial-to-trial variability: microvolts per component and channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Evoked {
    amplitudes: [[f64; C]; COMPONENTS.len()],
}

/// The fixed observer model.
pub struct Brain {
    /// Per channel, a normalised weight over the FIELD x FIELD visual field.
    fields: Vec<Vec<f64>>,
    /// Volume conduction: row-normalised blur from cortical patch under electrode j to electrode i.
    conduction: [[f64; C]; C],
    /// Lower Cholesky factor of the background noise's spatial correlation.
    noise_mix: [[f64; C]; C],
    alpha_weight: [f64; C],
    alpha_phase: [f64; C],
    /// Per late sub-component: source topographies [source][channel] and descriptor projections
    /// [source][descriptor].
    late_topography: Vec<[[f64; C]; LATE_SOURCES]>,
    late_projection: Vec<[[f64; DESCRIPTORS]; LATE_SOURCES]>,
    late_common: [f64; C],
    /// Reference means of the early features (per channel) and mean/std of the descriptors.
    contrast_mean: [f64; C],
    edge_mean: [f64; C],
    c1_scale: [f64; C],
    descriptor_mean: [f64; DESCRIPTORS],
    descriptor_std: [f64; DESCRIPTORS],
}

/// Local features of one figure under each electrode's part of the visual field.
struct Local {
    contrast: [f64; C],
    edge: [f64; C],
    c1: [f64; C],
}

fn dist(a: (f64, f64), b: (f64, f64)) -> f64 {
    ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt()
}

impl Brain {
    /// The observer, built once per process (building it renders the reference figures).
    pub fn shared() -> &'static Brain {
        static BRAIN: OnceLock<Brain> = OnceLock::new();
        BRAIN.get_or_init(Brain::new)
    }

    pub fn new() -> Brain {
        let mut rng = Rng::new(BRAIN_SEED);
        let fields = POSITIONS.iter().map(|&p| field_weights(p)).collect();

        let mut conduction = [[0.0; C]; C];
        let mut correlation = [[0.0; C]; C];
        for i in 0..C {
            for j in 0..C {
                let d = dist(POSITIONS[i], POSITIONS[j]);
                conduction[i][j] = (-d * d / (2.0 * 0.15f64.powi(2))).exp();
                correlation[i][j] = (-d / 0.5).exp();
            }
            let sum: f64 = conduction[i].iter().sum();
            conduction[i].iter_mut().for_each(|w| *w /= sum);
        }
        let noise_mix = cholesky(&correlation);

        let alpha_weight = POSITIONS.map(|(x, y)| (0.4 + 0.6 * (-y - 0.5) / 0.5 - 0.15 * x.abs()).clamp(0.3, 1.0));
        let alpha_phase = POSITIONS.map(|_| 0.3 * rng.normal());
        let late_common = POSITIONS.map(|p| (-dist(p, (0.0, -0.65)).powi(2) / (2.0 * 0.3f64.powi(2))).exp());

        let mut late_topography = Vec::new();
        let mut late_projection = Vec::new();
        for _ in EARLY..COMPONENTS.len() {
            let mut topo = [[0.0; C]; LATE_SOURCES];
            let mut proj = [[0.0; DESCRIPTORS]; LATE_SOURCES];
            for s in 0..LATE_SOURCES {
                // A patch of cortex somewhere under the posterior montage, seen with either polarity.
                let centre = (rng.uniform() * 1.6 - 0.8, -0.5 - rng.uniform() * 0.5);
                let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
                for (t, &p) in topo[s].iter_mut().zip(&POSITIONS) {
                    *t = sign * (-dist(p, centre).powi(2) / (2.0 * 0.3f64.powi(2))).exp();
                }
                for w in proj[s].iter_mut() {
                    *w = rng.normal() / (DESCRIPTORS as f64).sqrt();
                }
            }
            late_topography.push(topo);
            late_projection.push(proj);
        }

        let mut brain = Brain {
            fields,
            conduction,
            noise_mix,
            alpha_weight,
            alpha_phase,
            late_topography,
            late_projection,
            late_common,
            contrast_mean: [1.0; C],
            edge_mean: [1.0; C],
            c1_scale: [1.0; C],
            descriptor_mean: [0.0; DESCRIPTORS],
            descriptor_std: [1.0; DESCRIPTORS],
        };
        brain.calibrate(&mut rng);
        brain
    }

    /// Sets the feature normalisation from reference figures so each component's nominal amplitude means
    /// the same thing whatever the electrode or descriptor.
    fn calibrate(&mut self, rng: &mut Rng) {
        let n = REFERENCE_FIGURES as f64;
        let (mut contrast, mut edge, mut c1) = ([0.0; C], [0.0; C], [0.0; C]);
        let (mut dsum, mut dsq) = ([0.0; DESCRIPTORS], [0.0; DESCRIPTORS]);
        for _ in 0..REFERENCE_FIGURES {
            let r = Figure::random(rng).render();
            let local = self.local(&r);
            for e in 0..C {
                contrast[e] += local.contrast[e] / n;
                edge[e] += local.edge[e] / n;
                c1[e] += local.c1[e].abs() / n;
            }
            for (k, d) in descriptors(&r).iter().enumerate() {
                dsum[k] += d / n;
                dsq[k] += d * d / n;
            }
        }
        self.contrast_mean = contrast;
        self.edge_mean = edge;
        self.c1_scale = c1;
        self.descriptor_mean = dsum;
        for k in 0..DESCRIPTORS {
            self.descriptor_std[k] = (dsq[k] - dsum[k] * dsum[k]).max(1e-12).sqrt();
        }
    }

    fn local(&self, r: &Rendering) -> Local {
        let cov = block_mean(&r.coverage, IMAGE_SIZE, FIELD);
        let edge = block_mean(&r.edges, IMAGE_SIZE, FIELD);
        let mut out = Local { contrast: [0.0; C], edge: [0.0; C], c1: [0.0; C] };
        for e in 0..C {
            for (i, w) in self.fields[e].iter().enumerate() {
                // Visual elevation of this field point, +1 at the top: V1's folding makes the C1 positive
                // for the lower field and negative for the upper.
                let v = 1.0 - 2.0 * ((i / FIELD) as f64 + 0.5) / FIELD as f64;
                out.contrast[e] += w * cov[i] as f64;
                out.edge[e] += w * edge[i] as f64;
                out.c1[e] += w * cov[i] as f64 * (-3.0 * v).tanh();
            }
        }
        out
    }

    /// The evoked response a figure drives, at nominal amplitude (`snr` 1).
    pub fn evoked(&self, r: &Rendering) -> Evoked {
        let local = self.local(r);
        let mut cortex = [[0.0; C]; EARLY];
        for (e, ((c1, contrast), edge)) in local.c1.iter().zip(&local.contrast).zip(&local.edge).enumerate() {
            let contrast = contrast / self.contrast_mean[e];
            let edge = edge / self.edge_mean[e];
            cortex[0][e] = C1_UV * c1 / self.c1_scale[e];
            cortex[1][e] = P1_UV * (0.6 * contrast + 0.4 * edge);
            cortex[2][e] = N1_UV * (0.3 * contrast + 0.7 * edge);
        }
        let mut amplitudes = [[0.0; C]; COMPONENTS.len()];
        for (amp, patch) in amplitudes.iter_mut().zip(&cortex) {
            for (a, row) in amp.iter_mut().zip(&self.conduction) {
                *a = row.iter().zip(patch).map(|(w, p)| w * p).sum();
            }
        }
        let d = descriptors(r);
        let z: Vec<f64> = (0..DESCRIPTORS).map(|k| (d[k] - self.descriptor_mean[k]) / self.descriptor_std[k]).collect();
        for (l, amp) in amplitudes[EARLY..].iter_mut().enumerate() {
            for (a, common) in amp.iter_mut().zip(&self.late_common) {
                *a = LATE_COMMON_UV * common;
            }
            for (projection, topography) in self.late_projection[l].iter().zip(&self.late_topography[l]) {
                let activity: f64 = projection.iter().zip(&z).map(|(w, z)| w * z).sum();
                for (a, t) in amp.iter_mut().zip(topography) {
                    *a += LATE_IDENTITY_UV * activity * t;
                }
            }
        }
        Evoked { amplitudes }
    }

    /// One trial, channels x samples in microvolts, baseline-corrected on the 200 ms before onset. `snr`
    /// scales every stimulus-locked part (0: no response to the stimulus at all).
    pub fn simulate_trial(&self, evoked: &Evoked, snr: f64, rng: &mut Rng) -> Vec<f32> {
        let t = |i: usize| (i as f64 - BASELINE as f64) / SAMPLING_RATE_HZ;
        let mut x = vec![0.0f64; C * SAMPLES];

        if snr > 0.0 {
            let early_shift = EARLY_LATENCY_JITTER_S * rng.normal();
            let late_shift = LATE_LATENCY_JITTER_S * rng.normal();
            let early_gain = (EARLY_GAIN_JITTER * rng.normal()).exp();
            let late_gain = (LATE_GAIN_JITTER * rng.normal()).exp();
            for (k, &(_, peak, width)) in COMPONENTS.iter().enumerate() {
                let (shift, gain) = if k < EARLY { (early_shift, early_gain) } else { (late_shift, late_gain) };
                let course: Vec<f64> = (0..SAMPLES).map(|i| (-(t(i) - peak - shift).powi(2) / (2.0 * width * width)).exp()).collect();
                for e in 0..C {
                    let a = snr * gain * evoked.amplitudes[k][e];
                    for (v, g) in x[e * SAMPLES..(e + 1) * SAMPLES].iter_mut().zip(&course) {
                        *v += a * g;
                    }
                }
            }
        }

        // Alpha: one rhythm seen by every channel with its own weight and a small phase lag, waxing and
        // waning in bursts, suppressed after a stimulus (event-related desynchronisation).
        let freq = (10.0 + 0.8 * rng.normal()).clamp(8.0, 13.0);
        let phase = rng.uniform() * std::f64::consts::TAU;
        let amp = ALPHA_UV * (0.4 * rng.normal()).exp();
        let bursts: Vec<(f64, f64)> = (0..1 + rng.below(2)).map(|_| (rng.uniform() * 1.2 - 0.3, 0.1 + 0.25 * rng.uniform())).collect();
        let erd_depth = if snr > 0.0 { 0.5 } else { 0.0 };
        for i in 0..SAMPLES {
            let ti = t(i);
            let envelope: f64 = bursts.iter().map(|&(c, w)| (-(ti - c).powi(2) / (2.0 * w * w)).exp()).sum();
            let erd = 1.0 - erd_depth / (1.0 + (-(ti - 0.25) / 0.05).exp());
            for e in 0..C {
                let wave = (std::f64::consts::TAU * freq * ti + phase + self.alpha_phase[e]).sin();
                x[e * SAMPLES + i] += amp * self.alpha_weight[e] * envelope.min(1.0) * erd * wave;
            }
        }

        // Pink background: per channel a sum of AR(1) processes with log-spaced corner frequencies and equal
        // variance (a 1/f spectrum between 0.5 and 40 Hz), each started in its stationary distribution, then
        // mixed across channels to the scalp's spatial correlation.
        let mut pink = vec![0.0f64; C * SAMPLES];
        const CORNERS: usize = 6;
        for ch in pink.chunks_exact_mut(SAMPLES) {
            for k in 0..CORNERS {
                let f = 0.5 * 80f64.powf(k as f64 / (CORNERS - 1) as f64);
                let pole = (-std::f64::consts::TAU * f / SAMPLING_RATE_HZ).exp();
                let innovation = (1.0 - pole * pole).sqrt();
                let mut state = rng.normal();
                for v in ch.iter_mut() {
                    *v += state;
                    state = pole * state + innovation * rng.normal();
                }
            }
        }
        let scale = PINK_UV / (CORNERS as f64).sqrt();
        for e in 0..C {
            for i in 0..SAMPLES {
                let mixed: f64 = (0..=e).map(|j| self.noise_mix[e][j] * pink[j * SAMPLES + i]).sum();
                x[e * SAMPLES + i] += scale * mixed + SENSOR_UV * rng.normal();
            }
        }

        let mut out = Vec::with_capacity(C * SAMPLES);
        for ch in x.chunks_exact(SAMPLES) {
            let baseline = ch[..BASELINE].iter().sum::<f64>() / BASELINE as f64;
            out.extend(ch.iter().map(|v| (v - baseline) as f32));
        }
        out
    }
}

impl Default for Brain {
    fn default() -> Brain {
        Brain::new()
    }
}

/// The part of the visual field an electrode at scalp position `(x, y)` sees, as weights over a
/// FIELD x FIELD grid (row 0 at the top) summing to 1: contralateral, parietal sites weighted to the lower
/// field, occipital to the centre, lateral sites wider; a quarter-strength ipsilateral copy stands for
/// callosal input and volume conduction.
fn field_weights((x, y): (f64, f64)) -> Vec<f64> {
    let occipital = ((-y - 0.6) / 0.4).clamp(0.0, 1.0);
    let (cx, cy) = (-1.25 * x, -0.45 * (1.0 - occipital));
    let sigma = 0.28 + 0.15 * (1.0 - occipital) + 0.2 * x.abs();
    let mut w: Vec<f64> = (0..FIELD * FIELD)
        .map(|i| {
            let u = -1.0 + 2.0 * ((i % FIELD) as f64 + 0.5) / FIELD as f64;
            let v = 1.0 - 2.0 * ((i / FIELD) as f64 + 0.5) / FIELD as f64;
            let g = |cx: f64| (-((u - cx).powi(2) + (v - cy).powi(2)) / (2.0 * sigma * sigma)).exp();
            g(cx) + 0.25 * g(-cx)
        })
        .collect();
    let sum: f64 = w.iter().sum();
    w.iter_mut().for_each(|v| *v /= sum);
    w
}

/// Global shape descriptors: the low-frequency 2-D DCT of the 16 x 16 silhouette (all but the mean),
/// the area and the edge length.
fn descriptors(r: &Rendering) -> [f64; DESCRIPTORS] {
    let n = EDGE_SIZE;
    let small = block_mean(&r.coverage, IMAGE_SIZE, n);
    let mut out = [0.0; DESCRIPTORS];
    let basis = |k: usize, i: usize| (std::f64::consts::PI * k as f64 * (i as f64 + 0.5) / n as f64).cos();
    let mut d = 0;
    for a in 0..DCT {
        for b in 0..DCT {
            if a + b == 0 {
                continue;
            }
            out[d] = (0..n * n).map(|i| small[i] as f64 * basis(a, i % n) * basis(b, i / n)).sum::<f64>() / (n * n) as f64;
            d += 1;
        }
    }
    out[d] = small.iter().map(|&v| v as f64).sum::<f64>() / (n * n) as f64;
    out[d + 1] = r.edges.iter().map(|&v| v as f64).sum::<f64>() / (IMAGE_SIZE * IMAGE_SIZE) as f64;
    out
}

/// Lower Cholesky factor of a symmetric positive-definite matrix.
fn cholesky(a: &[[f64; C]; C]) -> [[f64; C]; C] {
    let mut l = [[0.0; C]; C];
    for i in 0..C {
        for j in 0..=i {
            let s: f64 = a[i][j] - (0..j).map(|k| l[i][k] * l[j][k]).sum::<f64>();
            l[i][j] = if i == j { s.max(1e-12).sqrt() } else { s / l[j][j] };
        }
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_match_things_eeg2() {
        let t = times();
        assert_eq!((t.len(), t[0], t[20], t[99]), (100, -0.2, 0.0, 0.79));
    }

    #[test]
    fn left_sites_see_the_right_field_and_parietal_sites_the_lower() {
        let centre_of_mass = |w: &[f64]| {
            w.iter().enumerate().fold((0.0, 0.0), |(u, v), (i, w)| (u + w * ((i % FIELD) as f64 - 15.5), v + w * (15.5 - (i / FIELD) as f64)))
        };
        let brain = Brain::new();
        let (u_p7, v_p7) = centre_of_mass(&brain.fields[0]);
        let (u_o2, v_o2) = centre_of_mass(&brain.fields[16]);
        assert!(u_p7 > 3.0 && v_p7 < -3.0, "P7 sees the lower right field: {u_p7} {v_p7}");
        assert!(u_o2 < -1.0 && v_o2.abs() < 1.0, "O2 sees the left field near the centre: {u_o2} {v_o2}");
    }

    #[test]
    fn noise_is_spatially_correlated_and_the_evoked_response_survives_averaging() {
        let brain = Brain::new();
        let r = Figure::random(&mut Rng::new(5)).render();
        let evoked = brain.evoked(&r);
        let mut rng = Rng::new(6);
        let (reps, mut mean) = (200, vec![0.0f64; C * SAMPLES]);
        let (mut o1o2, mut o1p8, mut o1sq, mut o2sq, mut p8sq) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for _ in 0..reps {
            let noise = brain.simulate_trial(&evoked, 0.0, &mut rng);
            // Pre-stimulus samples of O1 (14), Oz (15) and P8 (8).
            for i in 0..BASELINE {
                let (a, b, c) = (noise[14 * SAMPLES + i] as f64, noise[15 * SAMPLES + i] as f64, noise[8 * SAMPLES + i] as f64);
                o1o2 += a * b;
                o1p8 += a * c;
                o1sq += a * a;
                o2sq += b * b;
                p8sq += c * c;
            }
            let trial = brain.simulate_trial(&evoked, 1.0, &mut rng);
            mean.iter_mut().zip(&trial).for_each(|(m, v)| *m += *v as f64 / reps as f64);
        }
        let near = o1o2 / (o1sq * o2sq).sqrt();
        let far = o1p8 / (o1sq * p8sq).sqrt();
        assert!(near > 0.4 && near > far + 0.2, "neighbours correlate more than distant sites: {near} vs {far}");
        // The averaged N1 at O1 (170 ms = sample 37) is negative.
        assert!(mean[14 * SAMPLES + 37] < -1.0, "{}", mean[14 * SAMPLES + 37]);
    }
}
