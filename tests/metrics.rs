//! Metrics against scikit-image and numpy (tests/fixtures/eval/make_fixture.py) and on inputs whose answer is
//! known by construction.

mod common;

use sgdm::metrics::{
    correlation_top_k, derangement, mean_pairwise_correlation, mean_row_correlation, pearson, pixcorr, retrieval_top_k, ssim, two_way_identification,
};

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn ssim_and_pixcorr_match_scikit_image_and_numpy() {
    let text = std::fs::read_to_string(common::repo_root().join("tests/fixtures/eval/ssim_pixcorr.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let (h, w) = (case["height"].as_u64().unwrap() as usize, case["width"].as_u64().unwrap() as usize);
        let (a, b) = (floats(&case["a"]), floats(&case["b"]));
        // Both sides compute in float64 from the same float32 pixels: only summation order differs.
        let s = ssim(&a, &b, w, h, 1.0).unwrap();
        let want = case["ssim"].as_f64().unwrap();
        assert!((s - want).abs() < 1e-9, "SSIM {h}x{w}: {s} vs scikit-image {want}");
        let p = pixcorr(&a, &b).unwrap();
        let want = case["pixcorr"].as_f64().unwrap();
        assert!((p - want).abs() < 1e-9, "PixCorr {h}x{w}: {p} vs numpy {want}");
        assert!((ssim(&a, &a, w, h, 1.0).unwrap() - 1.0).abs() < 1e-12, "an image is identical to itself");
    }
    assert!(ssim(&[0.0; 100], &[0.0; 100], 10, 10, 1.0).unwrap_err().to_string().contains("at least 11x11"));
}

#[test]
fn retrieval_counts_ranks_with_ties_against_the_query() {
    // Keys equal to the queries: perfect retrieval.
    let q = common::random(8 * 5, -1.0, 1.0, 1);
    assert_eq!(retrieval_top_k(&q, &q, 5, &[1, 5]).unwrap(), [1.0, 1.0]);
    // Keys shifted by one row: the true key is never the best; with 8 items it ranks 2nd..8th.
    let shifted: Vec<f32> = q[5..].iter().chain(&q[..5]).copied().collect();
    let r = retrieval_top_k(&q, &shifted, 5, &[1, 8]).unwrap();
    assert!(r[0] < 1.0 && r[1] == 1.0, "{r:?}");
    // All keys identical: every key ties with the true one, so nothing is retrieved at top-1.
    assert_eq!(retrieval_top_k(&q, &[1.0; 40], 5, &[1]).unwrap(), [0.0]);
    assert!(retrieval_top_k(&q, &q[..35], 5, &[1]).is_err());
}

#[test]
fn two_way_identification_is_one_for_perfect_and_near_half_for_shuffled() {
    let n = 40;
    let seen = common::random(n * 16, 0.0, 1.0, 2);
    assert_eq!(two_way_identification(&seen, &seen, 16).unwrap(), 1.0);
    let perm = derangement(n, 3);
    let shuffled: Vec<f32> = perm.iter().flat_map(|&i| seen[i * 16..(i + 1) * 16].to_vec()).collect();
    let chance = two_way_identification(&shuffled, &seen, 16).unwrap();
    // 1560 pairs of random vectors: the win rate of a shuffled control stays within a few % of 0.5.
    assert!((chance - 0.5).abs() < 0.08, "shuffled 2-way identification {chance}");
}

#[test]
fn derangements_move_every_item_and_are_reproducible() {
    for n in [2, 3, 10, 200] {
        let p = derangement(n, 42);
        assert!(p.iter().enumerate().all(|(i, &x)| i != x));
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        assert_eq!(p, derangement(n, 42));
    }
}

#[test]
fn structure_matching_ranks_by_correlation_so_gain_and_offset_do_not_matter() {
    let (n, dim) = (12, 16);
    let truth = common::random(n * dim, 0.0, 1.0, 4);
    // Each prediction is its true map times a gain plus an offset: correlation 1, retrieved first, although
    // cosine similarity (retrieval_top_k's measure) would be fooled by the offsets.
    let predicted: Vec<f32> =
        truth.chunks_exact(dim).enumerate().flat_map(|(i, row)| row.iter().map(move |v| v * (0.5 + i as f32) + 3.0 * i as f32)).collect();
    assert_eq!(correlation_top_k(&predicted, &truth, dim, &[1, 5]).unwrap(), [1.0, 1.0]);
    assert!((mean_row_correlation(&predicted, &truth, dim).unwrap() - 1.0).abs() < 1e-6);
    // Against the maps deranged, the mean correlation is the mean of the mismatched pairs' correlations.
    let perm = derangement(n, 5);
    let shuffled: Vec<f32> = perm.iter().flat_map(|&j| truth[j * dim..(j + 1) * dim].to_vec()).collect();
    let want = (0..n).map(|i| pearson(&predicted[i * dim..(i + 1) * dim], &shuffled[i * dim..(i + 1) * dim])).sum::<f64>() / n as f64;
    assert!((mean_row_correlation(&predicted, &shuffled, dim).unwrap() - want).abs() < 1e-12);
    assert!(correlation_top_k(&predicted, &shuffled, dim, &[1]).unwrap()[0] < 1.0);
    // Constant predictions correlate 0 with every map: they tie with every true map, and ties count against.
    assert_eq!(correlation_top_k(&vec![0.7; n * dim], &truth, dim, &[1, 5]).unwrap(), [0.0, 0.0]);
    assert_eq!(mean_row_correlation(&vec![0.7; n * dim], &truth, dim).unwrap(), 0.0);
    assert!(correlation_top_k(&predicted, &truth[..dim * 3], dim, &[1]).is_err());
}

#[test]
fn pairwise_correlation_says_how_alike_a_set_of_maps_is() {
    let dim = 10;
    let one = common::random(dim, 0.0, 1.0, 6);
    // Copies of one map with gains and offsets: all alike.
    let copies: Vec<f32> = (0..5).flat_map(|k| one.iter().map(move |v| v * (1.0 + k as f32) - k as f32)).collect();
    assert!((mean_pairwise_correlation(&copies, dim).unwrap() - 1.0).abs() < 1e-6);
    // A map and its negation: -1. Three maps: the mean of the three pairs.
    let negated: Vec<f32> = one.iter().chain(one.iter().map(|v| -v).collect::<Vec<_>>().iter()).copied().collect();
    assert!((mean_pairwise_correlation(&negated, dim).unwrap() + 1.0).abs() < 1e-6);
    let three = common::random(3 * dim, 0.0, 1.0, 7);
    let row = |i: usize| &three[i * dim..(i + 1) * dim];
    let want = (pearson(row(0), row(1)) + pearson(row(0), row(2)) + pearson(row(1), row(2))) / 3.0;
    assert!((mean_pairwise_correlation(&three, dim).unwrap() - want).abs() < 1e-12);
    assert!(mean_pairwise_correlation(&one, dim).is_err(), "one map has no pairs");
}
