//! Tangram figures: the seven pieces, random compact arrangements of them on a lattice, the canonical
//! form that tells two silhouettes apart, and anti-aliased rendering with edge (structure) maps.
//!
//! Every piece, in every orientation used here, is a union of "quarters": the four triangles a unit cell
//! is cut into by its two diagonals. Working in quarters makes overlap and contact tests exact integer
//! set operations. The cost is that pieces turn in steps of 90 degrees (and mirror), not 45 as in
//! KiloGram; the silhouettes still mix axis-aligned and diagonal edges the way tangrams do.

use std::collections::HashSet;

use super::Rng;
use crate::data::structure::StructureMaps;

/// Side of the square lattice a figure is built on, in cells; a 32-quarter figure never reaches its border
/// from the centre.
const GRID: i32 = 20;

/// Rendered image side in pixels.
pub const IMAGE_SIZE: usize = crate::data::structure::STRUCTURE_SIZE;
/// Side of the downsampled edge map (the StructuralVAE structure head's output).
pub const EDGE_SIZE: usize = crate::data::structure::EDGE_SIZE;
/// Blank border around the figure's bounding box, in pixels.
const MARGIN: f64 = 10.0;
/// Samples per pixel side for anti-aliasing.
const SUPERSAMPLE: usize = 6;

/// The seven tangram pieces as convex polygons in lattice units (area 8 in all: the classic set cut from a
/// square of side 2*sqrt(2)).
const PIECES: [(&str, &[(i32, i32)]); 7] = [
    ("large triangle", &[(0, 0), (2, 0), (0, 2)]),
    ("large triangle", &[(0, 0), (2, 0), (0, 2)]),
    ("medium triangle", &[(0, 0), (2, 0), (1, 1)]),
    ("small triangle", &[(0, 0), (1, 0), (0, 1)]),
    ("small triangle", &[(0, 0), (1, 0), (0, 1)]),
    ("square", &[(0, 0), (1, 0), (1, 1), (0, 1)]),
    ("parallelogram", &[(0, 0), (1, 0), (2, 1), (1, 1)]),
];

/// One quarter: cell (x, y) and which triangle of it (0 bottom, 1 right, 2 top, 3 left; y points up).
type Quarter = (i32, i32, u8);

/// Six times the centroid of a quarter: integer, and never on a lattice line or diagonal, so it decides
/// exactly whether the quarter lies inside a piece.
fn centroid6((x, y, q): Quarter) -> (i32, i32) {
    let (cx, cy) = (6 * x, 6 * y);
    match q {
        0 => (cx + 3, cy + 1),
        1 => (cx + 5, cy + 3),
        2 => (cx + 3, cy + 5),
        _ => (cx + 1, cy + 3),
    }
}

/// The quarters sharing an edge with `q`: its two neighbours in the same cell and one across the cell edge.
fn neighbours((x, y, q): Quarter) -> [Quarter; 3] {
    let across = match q {
        0 => (x, y - 1, 2),
        1 => (x + 1, y, 3),
        2 => (x, y + 1, 0),
        _ => (x - 1, y, 1),
    };
    [(x, y, (q + 1) % 4), (x, y, (q + 3) % 4), across]
}

/// The quarters covered by a convex polygon with integer vertices (either winding).
fn rasterize(poly: &[(i32, i32)]) -> Vec<Quarter> {
    let (x1, y1) = (poly.iter().map(|p| p.0).max().unwrap(), poly.iter().map(|p| p.1).max().unwrap());
    let mut out = Vec::new();
    for x in 0..x1 {
        for y in 0..y1 {
            for q in 0..4 {
                let (px, py) = centroid6((x, y, q));
                let sides = poly
                    .iter()
                    .zip(poly.iter().cycle().skip(1))
                    .map(|(a, b)| ((b.0 - a.0) * 6) as i64 * (py - 6 * a.1) as i64 - ((b.1 - a.1) * 6) as i64 * (px - 6 * a.0) as i64);
                let signs: Vec<i64> = sides.map(i64::signum).collect();
                if signs.iter().all(|&s| s > 0) || signs.iter().all(|&s| s < 0) {
                    out.push((x, y, q));
                }
            }
        }
    }
    out
}

/// The 8 symmetries of the square applied to a point: `k` quarter turns, then a mirror if `mirror`.
fn transform((x, y): (i32, i32), k: u8, mirror: bool) -> (i32, i32) {
    let (mut x, mut y) = (x, y);
    for _ in 0..k {
        (x, y) = (-y, x);
    }
    if mirror {
        x = -x;
    }
    (x, y)
}

/// Every distinct orientation of a piece as a quarter set anchored at the origin.
fn orientations(poly: &[(i32, i32)]) -> Vec<Vec<Quarter>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for k in 0..4 {
        for mirror in [false, true] {
            let pts: Vec<_> = poly.iter().map(|&p| transform(p, k, mirror)).collect();
            let (mx, my) = (pts.iter().map(|p| p.0).min().unwrap(), pts.iter().map(|p| p.1).min().unwrap());
            let moved: Vec<_> = pts.iter().map(|&(x, y)| (x - mx, y - my)).collect();
            let quarters = rasterize(&moved);
            let mut key = quarters.clone();
            key.sort_unstable();
            if seen.insert(key) {
                out.push(quarters);
            }
        }
    }
    out
}

/// Which quarters of the GRID x GRID lattice are covered; anything outside it is empty.
struct Occupancy(Vec<bool>);

impl Default for Occupancy {
    fn default() -> Occupancy {
        Occupancy(vec![false; (GRID * GRID * 4) as usize])
    }
}

impl Occupancy {
    fn index((x, y, q): Quarter) -> Option<usize> {
        ((0..GRID).contains(&x) && (0..GRID).contains(&y)).then(|| ((y * GRID + x) * 4 + q as i32) as usize)
    }

    fn get(&self, q: Quarter) -> bool {
        Occupancy::index(q).is_some_and(|i| self.0[i])
    }

    fn set(&mut self, q: Quarter) {
        let i = Occupancy::index(q).expect("figures stay inside the lattice");
        self.0[i] = true;
    }

    /// The covered quarters, in lattice order.
    fn quarters(&self) -> Vec<Quarter> {
        let at = |i: usize| ((i / 4) as i32 % GRID, (i / 4) as i32 / GRID, (i % 4) as u8);
        (0..self.0.len()).filter(|&i| self.0[i]).map(at).collect()
    }
}

/// A tangram silhouette: the set of occupied quarters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    quarters: Vec<Quarter>,
}

impl Figure {
    /// Arranges the seven pieces into one figure: pieces are laid one at a time in random order, each in
    /// the orientation and position that shares the most edge length with the figure so far, give or take
    /// Gumbel noise (so the figure is compact yet varied). Every piece shares an edge with an earlier one.
    pub fn random(rng: &mut Rng) -> Figure {
        loop {
            if let Some(f) = Figure::try_random(rng) {
                return f;
            }
        }
    }

    /// One attempt at [`Figure::random`]; `None` when a piece has nowhere to go, which happens when the
    /// pieces so far expose only diagonal edges and the next one is the square.
    fn try_random(rng: &mut Rng) -> Option<Figure> {
        let mut order: Vec<usize> = (0..PIECES.len()).collect();
        rng.shuffle(&mut order);
        let mut occupied = Occupancy::default();
        for (n, &piece) in order.iter().enumerate() {
            let shapes = orientations(PIECES[piece].1);
            if n == 0 {
                let shape = &shapes[rng.below(shapes.len())];
                shape.iter().for_each(|&(x, y, q)| occupied.set((x + GRID / 2 - 1, y + GRID / 2 - 1, q)));
                continue;
            }
            let mut best: Option<(f64, Vec<Quarter>)> = None;
            let mut placed = Vec::with_capacity(8);
            for shape in &shapes {
                for dx in 0..GRID - 2 {
                    for dy in 0..GRID - 2 {
                        placed.clear();
                        placed.extend(shape.iter().map(|&(x, y, q)| (x + dx, y + dy, q)));
                        if placed.iter().any(|&p| occupied.get(p)) {
                            continue;
                        }
                        let contacts = placed.iter().flat_map(|&p| neighbours(p)).filter(|&p| occupied.get(p)).count();
                        if contacts == 0 {
                            continue;
                        }
                        let score = contacts as f64 + 1.5 * rng.gumbel();
                        if best.as_ref().is_none_or(|(s, _)| score > *s) {
                            best = Some((score, placed.clone()));
                        }
                    }
                }
            }
            let (_, placed) = best?;
            placed.into_iter().for_each(|p| occupied.set(p));
        }
        Some(Figure { quarters: occupied.quarters() })
    }

    /// The silhouette up to translation, rotation and mirroring: two figures with the same key look the
    /// same once turned, so splits are made disjoint on this key.
    pub fn canonical_key(&self) -> Vec<(i32, i32)> {
        let mut best: Option<Vec<(i32, i32)>> = None;
        for k in 0..4 {
            for mirror in [false, true] {
                let pts: Vec<_> = self.quarters.iter().map(|&q| transform(centroid6(q), k, mirror)).collect();
                let (mx, my) = (pts.iter().map(|p| p.0).min().unwrap(), pts.iter().map(|p| p.1).min().unwrap());
                let mut key: Vec<_> = pts.iter().map(|&(x, y)| (x - mx, y - my)).collect();
                key.sort_unstable();
                if best.as_ref().is_none_or(|b| key < *b) {
                    best = Some(key);
                }
            }
        }
        best.unwrap()
    }

    /// Number of quarters covered (32 for a complete tangram).
    pub fn len(&self) -> usize {
        self.quarters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.quarters.is_empty()
    }

    /// Renders the silhouette black on white, scaled to fit the image with a margin and centred, and its
    /// edge maps.
    pub fn render(&self) -> Rendering {
        let mut occupied = Occupancy::default();
        self.quarters.iter().for_each(|&q| occupied.set(q));
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y, q) in &self.quarters {
            // A quarter spans the full cell along its base and half of it towards the centre.
            let (qx0, qx1, qy0, qy1) = match q {
                0 => (0.0, 1.0, 0.0, 0.5),
                1 => (0.5, 1.0, 0.0, 1.0),
                2 => (0.0, 1.0, 0.5, 1.0),
                _ => (0.0, 0.5, 0.0, 1.0),
            };
            x0 = x0.min(x as f64 + qx0);
            x1 = x1.max(x as f64 + qx1);
            y0 = y0.min(y as f64 + qy0);
            y1 = y1.max(y as f64 + qy1);
        }
        let n = IMAGE_SIZE as f64;
        let scale = (n - 2.0 * MARGIN) / (x1 - x0).max(y1 - y0);
        let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
        let locate = |u: f64, v: f64| -> Quarter {
            // Pixel (u, v) with v down to lattice (x, y) with y up.
            let x = cx + (u - n / 2.0) / scale;
            let y = cy - (v - n / 2.0) / scale;
            let (cell_x, cell_y) = (x.floor(), y.floor());
            let (fx, fy) = (x - cell_x, y - cell_y);
            let q = match (fy < fx, fx + fy < 1.0) {
                (true, true) => 0,
                (true, false) => 1,
                (false, false) => 2,
                (false, true) => 3,
            };
            (cell_x as i32, cell_y as i32, q)
        };
        let mut coverage = vec![0.0f32; IMAGE_SIZE * IMAGE_SIZE];
        let step = 1.0 / SUPERSAMPLE as f64;
        for (i, c) in coverage.iter_mut().enumerate() {
            let (px, py) = ((i % IMAGE_SIZE) as f64, (i / IMAGE_SIZE) as f64);
            // A quarter is convex, so a pixel whose four corners lie in one quarter lies wholly in it: its
            // coverage is exact without supersampling (and equal to what supersampling gives).
            let corner = locate(px, py);
            if [locate(px + 1.0, py), locate(px, py + 1.0), locate(px + 1.0, py + 1.0)].iter().all(|&q| q == corner) {
                *c = occupied.get(corner) as u8 as f32;
                continue;
            }
            let mut hits = 0;
            for sy in 0..SUPERSAMPLE {
                for sx in 0..SUPERSAMPLE {
                    hits += occupied.get(locate(px + (sx as f64 + 0.5) * step, py + (sy as f64 + 0.5) * step)) as usize;
                }
            }
            *c = hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32;
        }
        Rendering::from_coverage(coverage)
    }
}

/// A rendered figure: coverage (1 where the black silhouette is) and edge maps, row-major, row 0 at the top.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendering {
    /// IMAGE_SIZE x IMAGE_SIZE, in [0, 1]; the image's grey level is 1 - coverage.
    pub coverage: Vec<f32>,
    /// IMAGE_SIZE x IMAGE_SIZE Sobel gradient magnitude of the coverage, in [0, 1]; a sharp step reads 1.
    pub edges: Vec<f32>,
    /// EDGE_SIZE x EDGE_SIZE block means of `edges`, scaled so the strongest block is 1.
    pub edges16: Vec<f32>,
}

impl Rendering {
    fn from_coverage(coverage: Vec<f32>) -> Rendering {
        let StructureMaps { edges, edges16 } = StructureMaps::from_coverage(&coverage, IMAGE_SIZE, EDGE_SIZE);
        Rendering { coverage, edges, edges16 }
    }

    /// The image as 8-bit grey levels, black figure on white.
    pub fn image_u8(&self) -> Vec<u8> {
        self.coverage.iter().map(|c| ((1.0 - c) * 255.0).round() as u8).collect()
    }

    /// The structure map as 8-bit grey levels, white edges on black (the ControlNet convention).
    pub fn structure_u8(&self) -> Vec<u8> {
        self.edges.iter().map(|e| (e * 255.0).round() as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_classic_areas_and_figures_all_seven() {
        let quarters: Vec<usize> = PIECES.iter().map(|p| rasterize(p.1).len()).collect();
        assert_eq!(quarters, [8, 8, 4, 2, 2, 4, 4], "areas 2, 2, 1, 0.5, 0.5, 1, 1 in quarters of 1/4");
        assert_eq!(orientations(PIECES[6].1).len(), 4, "the parallelogram has 4 orientations once mirrored");
        assert_eq!(orientations(PIECES[5].1).len(), 1);
        let mut rng = Rng::new(3);
        for _ in 0..20 {
            let f = Figure::random(&mut rng);
            assert_eq!(f.len(), 32);
            let r = f.render();
            let area: f32 = r.coverage.iter().sum();
            assert!(area > 1000.0 && area < 9000.0, "{area}");
        }
    }

    #[test]
    fn canonical_key_ignores_rotation_mirror_and_translation() {
        let f = Figure::random(&mut Rng::new(11));
        let turned = Figure {
            quarters: f
                .quarters
                .iter()
                .map(|&(x, y, q)| {
                    // A quarter turn maps cell (x, y) to (-y - 1, x) and moves each quarter one place on.
                    (-y - 1 + 5, x - 2, (q + 1) % 4)
                })
                .collect(),
        };
        assert_eq!(f.canonical_key(), turned.canonical_key());
        assert_ne!(f.canonical_key(), Figure::random(&mut Rng::new(12)).canonical_key());
    }
}
