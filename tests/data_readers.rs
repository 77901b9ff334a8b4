//! EEG readers against files written by real numpy 1.x and 2.x (tests/fixtures/data, see make_fixtures.py),
//! a THINGS-EEG2 file built byte by byte here, every validation error, hostile pickles, and the CLI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use sgdm::data::eeg::{EegData, EegFormat, EegRows, Repetitions};
use sgdm::data::npy::{header_bytes, write_f32, NpyDtype};
use sgdm::data::pickle::{self, Dtype, Value};

const THINGS_CHANNELS: [&str; 17] = ["P7", "P5", "P3", "P1", "Pz", "P2", "P4", "P6", "P8", "PO7", "PO3", "POz", "PO4", "PO8", "O1", "Oz", "O2"];

fn fixture(name: &str) -> PathBuf {
    common::repo_root().join("tests/fixtures/data").join(name)
}

/// What make_fixtures.py stores in every data array: (arange(n) % 1000) * 0.25 - 100.
fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 1000) as f32 * 0.25 - 100.0).collect()
}

fn err<T>(result: anyhow::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn things_eeg2_files_from_numpy_1_and_2_read_exactly() {
    for (name, dtype) in [("things_np1.npy", Dtype::F64), ("things_np2.npy", Dtype::F32)] {
        let eeg = EegData::open(fixture(name), Repetitions::Keep).unwrap();
        assert_eq!(eeg.format, EegFormat::ThingsEeg2, "{name}");
        assert_eq!(eeg.source_dtype, dtype, "{name}");
        assert_eq!(eeg.shape, [2, 2, 17, 100], "{name}");
        assert_eq!(eeg.data, values(2 * 2 * 17 * 100), "{name}");
        assert_eq!(eeg.ch_names.as_deref().unwrap(), THINGS_CHANNELS, "{name}");
        // np.round(np.arange(-20, 80) / 100, 2): numpy rounds by scaling, rint, unscaling.
        let times: Vec<f64> = (-20..80).map(|i| (i as f64 / 100.0 * 100.0).round() / 100.0).collect();
        assert_eq!(eeg.times.as_deref().unwrap(), times, "{name}");
        assert_eq!(eeg.sfreq(), Some(100.0), "{name}");
        assert_eq!(eeg.time_range(), Some((-0.2, 0.79)), "{name}");
        eeg.expect(17, 100).unwrap();
    }
}

#[test]
fn nice_pickles_protocols_2_4_5_from_numpy_1_and_2_read_exactly() {
    let names: Vec<String> = (1..=63).map(|i| format!("E{i:02}")).collect();
    for np in ["np1", "np2"] {
        for protocol in [2, 4, 5] {
            let name = format!("nice_{np}_p{protocol}.npy");
            let eeg = EegData::open(fixture(&name), Repetitions::Keep).unwrap();
            assert_eq!(eeg.format, EegFormat::PickledDict, "{name}");
            assert_eq!(eeg.source_dtype, if np == "np1" { Dtype::F16 } else { Dtype::F32 }, "{name}");
            assert_eq!(eeg.shape, [2, 2, 63, 4], "{name}");
            assert_eq!(eeg.data, values(2 * 2 * 63 * 4), "{name}");
            assert_eq!(eeg.ch_names.as_deref().unwrap(), names, "{name}");
            assert_eq!(eeg.times.as_deref().unwrap(), [0.0, 1.0 / 250.0, 2.0 / 250.0, 3.0 / 250.0], "{name}");
            assert_eq!(eeg.sfreq(), Some(250.0), "{name}");
        }
    }
}

#[test]
fn plain_npy_arrays_read_whole_and_by_rows() {
    let eeg = EegData::open(fixture("plain_f64_nct.npy"), Repetitions::Keep).unwrap();
    assert_eq!((eeg.format, eeg.shape, eeg.source_dtype), (EegFormat::NpyArray, [3, 1, 17, 10], Dtype::F64));
    assert_eq!(eeg.data, values(3 * 17 * 10));
    assert!(eeg.ch_names.is_none() && eeg.sfreq().is_none() && eeg.time_range().is_none());

    let rows = EegRows::open(fixture("plain_f32_nrct.npy")).unwrap();
    assert_eq!(rows.shape(), [5, 2, 3, 4]);
    let all = values(5 * 2 * 3 * 4);
    assert_eq!(rows.read(1..3).unwrap(), all[24..72]);
    assert_eq!(rows.read(4..5).unwrap(), all[96..]);
    assert!(rows.read(2..2).unwrap().is_empty());
    assert!(err(rows.read(3..6)).contains("plain_f32_nrct.npy: rows 3..6 are out of range (5 rows)"));
    assert!(err(EegRows::open(fixture("things_np1.npy"))).contains("cannot be read by rows"));
}

#[test]
fn repetitions_average_or_become_trials() {
    let keep = EegData::open(fixture("plain_f32_nrct.npy"), Repetitions::Keep).unwrap();
    let avg = EegData::open(fixture("plain_f32_nrct.npy"), Repetitions::Average).unwrap();
    let trials = EegData::open(fixture("plain_f32_nrct.npy"), Repetitions::Trials).unwrap();
    assert_eq!(avg.shape, [5, 1, 3, 4]);
    assert_eq!(trials.shape, [10, 1, 3, 4]);
    assert_eq!(trials.data, keep.data);
    for n in 0..5 {
        for j in 0..12 {
            let (a, b) = (keep.data[n * 24 + j], keep.data[n * 24 + 12 + j]);
            assert_eq!(avg.data[n * 12 + j], (a + b) / 2.0);
        }
    }
}

/// Pickle opcodes written the way numpy 1.x `np.save` writes an object array (protocol 3, GLOBAL, BINPUT/BINGET).
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Pickle {
        self.0.extend_from_slice(bytes);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Pickle {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Pickle {
        self.op(b"X").op(&(s.len() as u32).to_le_bytes()).op(s.as_bytes())
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Pickle {
        self.op(b"B").op(&(b.len() as u32).to_le_bytes()).op(b)
    }
    fn int(&mut self, i: i32) -> &mut Pickle {
        match u8::try_from(i) {
            Ok(b) => self.op(&[b'K', b]),
            Err(_) => self.op(b"J").op(&i.to_le_bytes()),
        }
    }
    /// `dtype(descr, False, True)` + BUILD `(3, order, None, None, None, -1, -1, flags)`; memo 3 is `numpy.dtype`.
    fn dtype(&mut self, descr: &str, order: &str, flags: i32) -> &mut Pickle {
        self.op(b"h\x03").str(descr).op(b"\x89\x88\x87R(").int(3).str(order).op(b"NNN").int(-1).int(-1).int(flags).op(b"tb")
    }
    /// `_reconstruct(ndarray, (0,), b'b')` + BUILD `(1, shape, dtype, fortran, data)`; memo 0, 1, 2 hold the
    /// first three.
    fn array(&mut self, shape: &[usize], descr: &str, fortran: bool, data: &[u8]) -> &mut Pickle {
        self.op(b"h\x00h\x01").int(0).op(b"\x85h\x02\x87R(").int(1).op(b"(");
        for &d in shape {
            self.int(d as i32);
        }
        self.op(b"t").dtype(descr, "<", 0).op(if fortran { b"\x88" } else { b"\x89" }).bytes(data).op(b"tb")
    }
    /// The np.save prologue: a 0-d object array whose BUILD state ends with a list, left open for one dict.
    fn npsave_prologue(&mut self) -> &mut Pickle {
        self.op(b"\x80\x03").global("numpy.core.multiarray", "_reconstruct").op(b"q\x00");
        self.global("numpy", "ndarray").op(b"q\x01").int(0).op(b"\x85C\x01bq\x02\x87R(").int(1).op(b")");
        self.global("numpy", "dtype").op(b"q\x03").op(b"X\x02\x00\x00\x00O8\x89\x88\x87R(").int(3).str("|");
        self.op(b"NNN").int(-1).int(-1).int(63).op(b"tb\x89]")
    }
    fn npsave_epilogue(&mut self) -> &mut Pickle {
        self.op(b"atb.")
    }
}

fn f64_bytes(v: impl IntoIterator<Item = f64>) -> Vec<u8> {
    v.into_iter().flat_map(f64::to_le_bytes).collect()
}

/// A THINGS-EEG2 preprocessed file as numpy 1.x writes it, with `n` images and `r` repetitions.
fn things_file(n: usize, r: usize, eeg: &[f64], fortran: bool) -> Vec<u8> {
    let mut p = Pickle(Vec::new());
    p.npsave_prologue().op(b"}(").str("preprocessed_eeg_data");
    p.array(&[n, r, 17, 100], "f8", fortran, &f64_bytes(eeg.iter().copied()));
    p.str("ch_names").op(b"](");
    for name in THINGS_CHANNELS {
        p.str(name);
    }
    p.op(b"e").str("times").array(&[100], "f8", false, &f64_bytes((0..100).map(|i| -0.2 + i as f64 * 0.01)));
    p.op(b"u").npsave_epilogue();
    let mut file = header_bytes(NpyDtype::Object, &[]);
    file.extend_from_slice(&p.0);
    file
}

#[test]
fn things_eeg2_file_built_byte_by_byte_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessed_eeg_training.npy");
    let eeg: Vec<f64> = (0..2 * 3 * 17 * 100).map(|i| i as f64 * 0.5 - 7.0).collect();
    std::fs::write(&path, things_file(2, 3, &eeg, false)).unwrap();

    let got = EegData::open(&path, Repetitions::Keep).unwrap();
    assert_eq!((got.format, got.shape, got.source_dtype), (EegFormat::ThingsEeg2, [2, 3, 17, 100], Dtype::F64));
    assert_eq!(got.data, eeg.iter().map(|&v| v as f32).collect::<Vec<_>>());
    assert_eq!(got.ch_names.as_deref().unwrap(), THINGS_CHANNELS);
    assert_eq!(got.times.as_deref().unwrap()[0], -0.2);
    assert_eq!(got.time_range(), Some((-0.2, -0.2 + 99.0 * 0.01)));
    assert_eq!(got.sfreq(), Some(100.0));
    got.expect(17, 100).unwrap();

    let avg = EegData::open(&path, Repetitions::Average).unwrap();
    assert_eq!(avg.shape, [2, 1, 17, 100]);
    let row = 17 * 100;
    for (i, v) in avg.data.iter().enumerate() {
        let (n, j) = (i / row, i % row);
        let want = (0..3).map(|r| eeg[(n * 3 + r) * row + j]).sum::<f64>() / 3.0;
        assert!((*v as f64 - want).abs() < 1e-4, "{i}: {v} vs {want}");
    }

    // The same bytes through the raw unpickler: a 0-d object array holding the dict.
    let bytes = std::fs::read(&path).unwrap();
    let header = sgdm::data::npy::parse_header(&bytes, &path).unwrap();
    let Value::Array(root) = pickle::load(&bytes[header.data_offset..], &path).unwrap() else { panic!("not an array") };
    assert_eq!((root.dtype, root.shape.len()), (Dtype::Object, 0));
}

#[test]
fn non_finite_values_are_reported_with_the_first_index_and_count() {
    let e = err(EegData::open(fixture("nan.npy"), Repetitions::Keep));
    assert!(e.contains("nan.npy: 2 non-finite value(s)") && e.contains("[1, 0, 0, 1]"), "{e}");
    let eeg = EegData::open_unchecked(fixture("nan.npy")).unwrap();
    let nf = eeg.non_finite().unwrap();
    assert_eq!((nf.count, nf.first), (2, [1, 0, 0, 1]));
    let rows = EegRows::open(fixture("nan.npy")).unwrap();
    rows.read(0..1).unwrap();
    assert!(err(rows.read(1..2)).contains("[1, 0, 0, 1]"));
}

#[test]
fn fortran_order_is_refused_in_npy_and_in_pickled_arrays() {
    assert!(err(EegData::open(fixture("fortran.npy"), Repetitions::Keep)).contains("fortran.npy: array is in Fortran order"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.npy");
    std::fs::write(&path, things_file(1, 1, &[0.0; 1700], true)).unwrap();
    let e = err(EegData::open(&path, Repetitions::Keep));
    assert!(e.contains("f.npy: pickle byte") && e.contains("Fortran order"), "{e}");
}

#[test]
fn channel_and_time_mismatches_name_the_file_and_both_sizes() {
    let eeg = EegData::open(fixture("nice_np2_p4.npy"), Repetitions::Keep).unwrap();
    let e = err(eeg.expect(17, 100));
    assert!(e.contains("nice_np2_p4.npy: holds 63 channels × 4 time points") && e.contains("expects 17 × 100"), "{e}");
}

#[test]
fn wrong_rank_missing_keys_and_wrong_types_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rank2.npy");
    write_f32(&path, &[3, 4], &[0.0; 12]).unwrap();
    assert!(err(EegData::open(&path, Repetitions::Keep)).contains("rank2.npy: EEG array has rank 2 (shape [3, 4])"));

    let dict = |entries: &dyn Fn(&mut Pickle)| {
        let mut p = Pickle(Vec::new());
        p.npsave_prologue().op(b"}(");
        entries(&mut p);
        p.op(b"u").npsave_epilogue();
        let mut file = header_bytes(NpyDtype::Object, &[]);
        file.extend_from_slice(&p.0);
        EegData::from_bytes(&file, Path::new("d.npy")).map(|e| e.shape)
    };
    let data = |p: &mut Pickle| {
        p.str("preprocessed_eeg_data").array(&[1, 2, 3], "f8", false, &[0; 48]);
    };
    let e = err(dict(&|p| data(p)));
    assert!(e.contains("d.npy: the dict lacks the key 'ch_names' (it has: preprocessed_eeg_data)"), "{e}");
    let e = err(dict(&|p| {
        data(p);
        p.str("ch_names").int(5);
    }));
    assert!(e.contains("d.npy: 'ch_names' is a int"), "{e}");
    let e = err(dict(&|p| {
        data(p);
        p.str("ch_names").op(b"](").str("a").op(b"e");
    }));
    assert!(e.contains("'ch_names' names 1 channels, 'preprocessed_eeg_data' has 2"), "{e}");
    let e = err(dict(&|p| {
        data(p);
        p.str("ch_names").op(b"](").str("a").str("b").op(b"e").str("times").array(&[3], "f8", false, &[0; 24]);
    }));
    assert!(e.contains("'times' does not increase at index 1"), "{e}");
    let e = err(dict(&|p| {
        p.str("preprocessed_eeg_data").str("oops");
    }));
    assert!(e.contains("'preprocessed_eeg_data' is a str, expected a numpy float array"), "{e}");
    let e = err(dict(&|p| {
        p.str("preprocessed_eeg_data").array(&[4], "f8", false, &[0; 24]);
    }));
    assert!(e.contains("holds 24 bytes, not 4×8"), "{e}");
}

#[test]
fn hostile_and_malformed_pickles_are_refused_with_offset_and_reason() {
    let e = err(EegData::open(fixture("hostile_os_system.npy"), Repetitions::Keep));
    assert!(e.contains("hostile_os_system.npy: pickle byte 2: global os.system is not allowed"), "{e}");

    let p = Path::new("h.pkl");
    let load = |bytes: &[u8]| err(pickle::load(bytes, p));
    // STACK_GLOBAL builtins.eval, protocol 4.
    let e = load(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.");
    assert!(e.contains("h.pkl: pickle byte 18: global builtins.eval is not allowed"), "{e}");
    let e = load(b"\x80\x02K\x01\xff.");
    assert!(e.contains("pickle byte 4: opcode 0xff"), "{e}");
    let e = load(b"\x80\x02I1\n.");
    assert!(e.contains("pickle byte 2: opcode 0x49 ('I')"), "{e}");
    // REDUCE on a value, BUILD on a dict, an allowed global called the wrong way.
    assert!(load(b"\x80\x02K\x01)R.").contains("REDUCE calls a int, not an allowed global"));
    assert!(load(b"\x80\x02})b.").contains("BUILD on a dict"));
    assert!(load(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00utf8\x86R.").contains("REDUCE of CodecsEncode"));
    assert!(load(b"\x80\x01N.").contains("protocol 1"));
    assert!(load(b"\x80\x02h\x05.").contains("memo key 5 was never stored"));
    assert!(load(b"\x80\x020.").contains("stack underflow"));

    let things = std::fs::read(fixture("things_np1.npy")).unwrap();
    let header = sgdm::data::npy::parse_header(&things, p).unwrap();
    let body = &things[header.data_offset..];
    for cut in [1, 2, 40, 300, body.len() / 2, body.len() - 1] {
        let e = load(&body[..cut]);
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
    let e = err(EegData::from_bytes(&things[..things.len() - 1], Path::new("cut.npy")));
    assert!(e.contains("cut.npy: pickle byte") && e.contains("truncated"), "{e}");
}

#[test]
fn hostile_pickles_cannot_exhaust_the_stack_or_memory() {
    let p = Path::new("h.pkl");
    // A million nested lists: refused at depth 64, not a stack overflow on drop.
    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b']', 1_000_000));
    deep.extend(std::iter::repeat_n(b'a', 999_999));
    deep.push(b'.');
    assert!(err(pickle::load(&deep, p)).contains("nest deeper than 64"));
    // A 1 MiB string memoised, then fetched 100 000 times: 100 GiB of copies, refused by the memory budget.
    let mut big = b"\x80\x02X\x00\x00\x10\x00".to_vec();
    big.extend(std::iter::repeat_n(b'x', 1 << 20));
    big.extend_from_slice(b"q\x00");
    for _ in 0..100_000 {
        big.extend_from_slice(b"h\x00");
    }
    big.push(b'.');
    assert!(err(pickle::load(&big, p)).contains("memory budget"));
    // Two million Nones: refused by the opcode limit before they take 200 MB.
    let mut many = b"\x80\x02(".to_vec();
    many.extend(std::iter::repeat_n(b'N', 2_000_000));
    many.extend_from_slice(b"l.");
    assert!(err(pickle::load(&many, p)).contains("more than 1048576 opcodes"));
    // Lengths beyond the input are truncation, not allocation.
    assert!(err(pickle::load(b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f.", p)).contains("truncated"));
}

#[test]
fn truncated_and_bit_flipped_fixtures_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let p = Path::new("mutant.npy");
    for entry in std::fs::read_dir(fixture("")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "npy") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for cut in 0..bytes.len().min(400) {
            let _ = EegData::from_bytes(&bytes[..cut], p);
        }
        for _ in 0..300 {
            let mut m = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % m.len();
                m[i] = next() as u8;
            }
            let _ = EegData::from_bytes(&m, p);
        }
    }
}

fn sgdm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::sgdm_bin()).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn cli_data_inspect_prints_the_summary_and_fails_on_bad_files() {
    let things = fixture("things_np2.npy");
    let (ok, out, _) = sgdm(&["data", "inspect", things.to_str().unwrap()]);
    assert!(ok, "{out}");
    for line in [
        "format         THINGS-EEG2 preprocessed (np.save of a dict)",
        "shape          [2, 2, 17, 100] (rows, repetitions, channels, time)",
        "dtype          float32",
        "channels       17: P7, P5, P3, P1, Pz, P2, P4, P6, P8, PO7, PO3, POz, PO4, PO8, O1, Oz, O2",
        "sampling rate  100 Hz",
        "time range     -0.200 .. 0.790 s",
        "non-finite     0",
    ] {
        assert!(out.contains(line), "missing {line:?} in\n{out}");
    }
    assert_eq!(out.lines().filter(|l| l.starts_with('P') || l.starts_with('O')).count(), 17, "{out}");

    let (ok, out, _) = sgdm(&["data", "inspect", fixture("nan.npy").to_str().unwrap()]);
    assert!(ok && out.contains("non-finite     2 (NaN or Inf; first at [row, repetition, channel, t] = [1, 0, 0, 1])"), "{out}");

    let (ok, _, err) = sgdm(&["data", "inspect", fixture("hostile_os_system.npy").to_str().unwrap()]);
    assert!(!ok && err.contains("global os.system is not allowed"), "{err}");
    let (ok, _, err) = sgdm(&["data", "inspect", "/nonexistent/eeg.npy"]);
    assert!(!ok && err.contains("/nonexistent/eeg.npy: cannot open"), "{err}");
    let (ok, out, _) = sgdm(&["data", "inspect", "--help"]);
    assert!(ok && out.contains("Examples:"), "{out}");
}

#[test]
fn zero_width_string_arrays_cannot_claim_unbounded_elements() {
    // dtype('U0') with shape (2**62,) and no data: refused, not a 2**62-element allocation.
    let mut p = Pickle(b"\x80\x03".to_vec());
    p.global("numpy.core.multiarray", "_reconstruct").op(b"q\x00").global("numpy", "ndarray").op(b"q\x01");
    p.op(b"C\x01bq\x02").global("numpy", "dtype").op(b"q\x03");
    p.op(b"h\x00h\x01").int(0).op(b"\x85h\x02\x87R(").int(1).op(b"(\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40t");
    p.dtype("U0", "<", 8).op(b"\x89").bytes(&[]).op(b"tb.");
    let e = err(pickle::load(&p.0, Path::new("u0.pkl")));
    assert!(e.contains("u0.pkl: pickle byte") && e.contains("numpy dtype \"U0\" is not read"), "{e}");
}

#[test]
fn numpy_scalars_unpickle_to_plain_numbers() {
    // pickle.dumps({'s': np.float64(1.5), 'i': np.int64(-3)}, protocol=4) under numpy 2.4.
    let bytes = b"\x80\x04\x95\xab\x00\x00\x00\x00\x00\x00\x00\x7d\x94\x28\x8c\x01\x73\x94\x8c\x16\x6e\x75\x6d\x70\x79\x2e\x5f\x63\x6f\x72\x65\x2e\x6d\x75\x6c\x74\x69\x61\x72\x72\x61\x79\x94\x8c\x06\x73\x63\x61\x6c\x61\x72\x94\x93\x94\x8c\x05\x6e\x75\x6d\x70\x79\x94\x8c\x05\x64\x74\x79\x70\x65\x94\x93\x94\x8c\x02\x66\x38\x94\x89\x88\x87\x94\x52\x94\x28\x4b\x03\x8c\x01\x3c\x94\x4e\x4e\x4e\x4a\xff\xff\xff\xff\x4a\xff\xff\xff\xff\x4b\x00\x74\x94\x62\x43\x08\x00\x00\x00\x00\x00\x00\xf8\x3f\x94\x86\x94\x52\x94\x8c\x01\x69\x94\x68\x04\x68\x07\x8c\x02\x69\x38\x94\x89\x88\x87\x94\x52\x94\x28\x4b\x03\x68\x0b\x4e\x4e\x4e\x4a\xff\xff\xff\xff\x4a\xff\xff\xff\xff\x4b\x00\x74\x94\x62\x43\x08\xfd\xff\xff\xff\xff\xff\xff\xff\x94\x86\x94\x52\x94\x75\x2e";
    let v = pickle::load(bytes, Path::new("s.pkl")).unwrap();
    assert_eq!(v.get("s"), Some(&Value::Float(1.5)));
    assert_eq!(v.get("i"), Some(&Value::Int(-3)));
}

#[test]
fn fuzz_found_memo_copy_bombs_are_refused() {
    // Found by cargo-fuzz when the memo budget counted values rather than bytes: each took over 10 s and
    // 1.4 GB; now refused by the memory budget.
    for name in ["slow_memo_copies_1.bin", "slow_memo_copies_2.bin"] {
        let e = err(EegData::open(fixture("fuzz").join(name), Repetitions::Keep));
        assert!(e.contains(name) && e.contains("memory budget"), "{e}");
    }
}
