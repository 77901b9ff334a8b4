//! THINGS image folders (`training_images/<concept>/<file>.jpg`, `test_images/...`) in THINGS order: concept
//! folders sorted by name (`00001_aardvark`, ...), images sorted by name within each, which is the order of
//! the rows of THINGS-EEG2's preprocessed EEG. Anything unexpected in the tree is an error, never skipped.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// Images in THINGS order, with the concept each belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub images: Vec<PathBuf>,
    /// `concepts[i]` is the folder name of `images[i]`.
    pub concepts: Vec<String>,
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("{}: cannot list", dir.display()))?;
    entries.retain(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')));
    entries.sort();
    Ok(entries)
}

impl ImageFolder {
    /// Reads a THINGS image folder: one sub-folder per concept, images (JPEG or PNG) inside.
    pub fn open(root: impl AsRef<Path>) -> Result<ImageFolder> {
        let root = root.as_ref().to_path_buf();
        ensure!(root.is_dir(), "{}: not a directory of concept folders", root.display());
        let mut images = Vec::new();
        let mut concepts = Vec::new();
        for concept_dir in sorted_entries(&root)? {
            ensure!(concept_dir.is_dir(), "{}: unexpected file; a THINGS image folder holds only concept folders", concept_dir.display());
            let concept = concept_dir.file_name().unwrap().to_string_lossy().into_owned();
            let before = images.len();
            for file in sorted_entries(&concept_dir)? {
                if !is_image(&file) {
                    bail!("{}: not an image (expected .jpg, .jpeg or .png)", file.display());
                }
                images.push(file);
                concepts.push(concept.clone());
            }
            ensure!(images.len() > before, "{}: concept folder holds no image", concept_dir.display());
        }
        ensure!(!images.is_empty(), "{}: holds no concept folder", root.display());
        Ok(ImageFolder { root, images, concepts })
    }

    /// Checks that the images pair one to one with the rows of an EEG file.
    pub fn check_pairs_with(&self, eeg_rows: usize, eeg_path: &Path) -> Result<()> {
        ensure!(
            self.images.len() == eeg_rows,
            "{} has {} EEG rows but {} holds {} images in {} concepts: they do not pair up (THINGS-EEG2 has \
             16540 training and 200 test images)",
            eeg_path.display(),
            eeg_rows,
            self.root.display(),
            self.images.len(),
            self.concept_count()
        );
        Ok(())
    }

    pub fn concept_count(&self) -> usize {
        let mut n = 0;
        for (i, c) in self.concepts.iter().enumerate() {
            n += (i == 0 || self.concepts[i - 1] != *c) as usize;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    #[test]
    fn images_come_in_things_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("training_images");
        for f in [
            "00002_abacus/abacus_02s.jpg",
            "00001_aardvark/aardvark_10s.jpg",
            "00001_aardvark/aardvark_01b.jpg",
            "00002_abacus/abacus_01b.JPG",
            "00002_abacus/.DS_Store",
        ] {
            touch(&root.join(f));
        }
        let set = ImageFolder::open(&root).unwrap();
        let names: Vec<String> = set.images.iter().map(|p| p.strip_prefix(&root).unwrap().display().to_string()).collect();
        assert_eq!(
            names,
            ["00001_aardvark/aardvark_01b.jpg", "00001_aardvark/aardvark_10s.jpg", "00002_abacus/abacus_01b.JPG", "00002_abacus/abacus_02s.jpg"]
        );
        assert_eq!(set.concepts, ["00001_aardvark", "00001_aardvark", "00002_abacus", "00002_abacus"]);
        assert_eq!(set.concept_count(), 2);
        set.check_pairs_with(4, Path::new("eeg.npy")).unwrap();
        let err = set.check_pairs_with(16540, Path::new("eeg.npy")).unwrap_err().to_string();
        assert!(err.contains("eeg.npy has 16540 EEG rows") && err.contains("4 images in 2 concepts"), "{err}");
    }

    #[test]
    fn unexpected_content_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("test_images");
        touch(&root.join("00001_a/a.jpg"));
        touch(&root.join("00001_a/notes.txt"));
        assert!(ImageFolder::open(&root).unwrap_err().to_string().contains("notes.txt: not an image"));
        std::fs::remove_file(root.join("00001_a/notes.txt")).unwrap();
        touch(&root.join("stray.jpg"));
        assert!(ImageFolder::open(&root).unwrap_err().to_string().contains("stray.jpg: unexpected file"));
        std::fs::remove_file(root.join("stray.jpg")).unwrap();
        std::fs::create_dir(root.join("00002_empty")).unwrap();
        assert!(ImageFolder::open(&root).unwrap_err().to_string().contains("00002_empty: concept folder holds no image"));
        assert!(ImageFolder::open(dir.path().join("absent")).is_err());
    }
}
