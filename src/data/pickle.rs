//! A restricted unpickler for the pickles numpy writes (protocols 2 to 5): it decodes the opcode stream into a
//! `Value` tree of plain Python values and numpy arrays, natively, and never runs anything. The only globals
//! accepted are the numpy array/dtype/scalar constructors (under numpy 1.x `numpy.core` and numpy 2.x
//! `numpy._core` names) and `_codecs.encode` (protocol 2 spells bytes that way); any other global, unknown
//! opcode or call is an error naming the file and byte offset. Work and nesting are bounded, so a hostile
//! file can neither exhaust memory nor the stack.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use anyhow::{bail, Result};

/// Deepest container nesting accepted; numpy's files nest four deep.
const MAX_DEPTH: u16 = 64;
/// Bytes allowed for copies into and out of the memo, beyond a multiple of the input size: a file may fetch a
/// memoised value many times, and each fetch is a copy.
const COPY_BUDGET_BASE: usize = 16 << 20;
/// Opcodes run at most. Each creates at most one value, so this bounds memory (about 100 bytes a value) where
/// the input size does not; numpy's EEG pickles run a few hundred.
const MAX_OPCODES: usize = 1 << 20;
/// What one value costs in memory, apart from bytes it owns.
const NODE: usize = std::mem::size_of::<Item>();

/// An allowed global: a numpy constructor, or `_codecs.encode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `numpy.core.multiarray._reconstruct` (numpy 2.x: `numpy._core.multiarray`): an empty array, filled by BUILD.
    Reconstruct,
    /// `numpy.ndarray`, the first argument of `_reconstruct`.
    Ndarray,
    /// `numpy.dtype`.
    Dtype,
    /// `numpy.core.multiarray.scalar`: a numpy scalar from a dtype and its bytes.
    Scalar,
    /// `numpy.core.numeric._frombuffer`: protocol 5's array from an in-band buffer.
    FromBuffer,
    /// `_codecs.encode(str, 'latin1')`: how protocol 2 writes bytes.
    CodecsEncode,
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        match (module, name) {
            ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => Some(Global::Reconstruct),
            ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => Some(Global::Scalar),
            ("numpy.core.numeric" | "numpy._core.numeric", "_frombuffer") => Some(Global::FromBuffer),
            ("numpy", "ndarray") => Some(Global::Ndarray),
            ("numpy", "dtype") => Some(Global::Dtype),
            ("_codecs", "encode") => Some(Global::CodecsEncode),
            _ => None,
        }
    }
}

/// A numpy element type, little endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F16,
    F32,
    F64,
    I8,
    I32,
    I64,
    /// `<U{n}`: fixed-width strings of `n` UTF-32 code points.
    Unicode(usize),
    /// `O`: Python objects.
    Object,
}

impl Dtype {
    fn parse(descr: &str) -> Option<Dtype> {
        let descr = descr.trim_start_matches(['<', '|', '=']);
        match descr {
            "f2" | "e" => Some(Dtype::F16),
            "f4" | "f" => Some(Dtype::F32),
            "f8" | "d" => Some(Dtype::F64),
            "i1" | "b" => Some(Dtype::I8),
            "i4" | "i" => Some(Dtype::I32),
            "i8" | "q" => Some(Dtype::I64),
            "O" | "O8" => Some(Dtype::Object),
            // Bounds on the width keep `size()` from overflowing and a zero-width array from claiming any number of
            // elements; channel names are a few characters.
            d => d.strip_prefix('U').and_then(|n| n.parse().ok()).filter(|&n| (1..=1 << 16).contains(&n)).map(Dtype::Unicode),
        }
    }

    /// Bytes per element; object arrays hold values, not bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::I8 | Dtype::Object => 1,
            Dtype::F16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::Unicode(n) => 4 * n,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dtype::F16 => f.write_str("float16"),
            Dtype::F32 => f.write_str("float32"),
            Dtype::F64 => f.write_str("float64"),
            Dtype::I8 => f.write_str("int8"),
            Dtype::I32 => f.write_str("int32"),
            Dtype::I64 => f.write_str("int64"),
            Dtype::Unicode(n) => write!(f, "<U{n}"),
            Dtype::Object => f.write_str("object"),
        }
    }
}

/// Array contents: raw little-endian C-order bytes, or one value per element for object arrays.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayData<'a> {
    Raw(Cow<'a, [u8]>),
    Objects(Vec<Value<'a>>),
}

/// A numpy ndarray in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: ArrayData<'a>,
}

impl NdArray<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements of a numeric array as f64 (the exact value for every supported numeric dtype but large int64).
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        let ArrayData::Raw(bytes) = &self.data else { return None };
        let v = match self.dtype {
            Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            Dtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::I8 => bytes.iter().map(|&b| b as i8 as f64).collect(),
            Dtype::I32 => bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            Dtype::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            Dtype::Unicode(_) | Dtype::Object => return None,
        };
        Some(v)
    }

    /// Elements of a `<U` array as strings (trailing NULs removed, as numpy does).
    pub fn to_strings(&self) -> Option<Vec<String>> {
        let (Dtype::Unicode(n), ArrayData::Raw(bytes)) = (self.dtype, &self.data) else { return None };
        bytes
            .chunks_exact(4 * n)
            .map(|item| {
                item.chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                    .take_while(|&c| c != 0)
                    .map(char::from_u32)
                    .collect::<Option<String>>()
            })
            .collect()
    }
}

/// A decoded pickle value. `Global` and `Dtype` appear only where the pickle holds a bare numpy object.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Cow<'a, [u8]>),
    List(Vec<Value<'a>>),
    Tuple(Vec<Value<'a>>),
    /// Key-value pairs in insertion order.
    Dict(Vec<(Value<'a>, Value<'a>)>),
    Array(NdArray<'a>),
    Dtype(Dtype),
    Global(Global),
}

impl<'a> Value<'a> {
    /// What kind of value this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Array(_) => "numpy array",
            Value::Dtype(_) => "numpy dtype",
            Value::Global(_) => "global",
        }
    }

    /// The value under a string key of a dict.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        let Value::Dict(items) = self else { return None };
        items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v)
    }
}

/// A value on the unpickler's stack, with its nesting depth and the bytes a copy of it takes.
#[derive(Clone)]
struct Item<'a> {
    value: Value<'a>,
    depth: u16,
    weight: usize,
}

impl<'a> Item<'a> {
    fn leaf(value: Value<'a>) -> Item<'a> {
        let weight = NODE
            + match &value {
                Value::Str(s) => s.len(),
                Value::Bytes(Cow::Owned(b)) => b.len(),
                _ => 0,
            };
        Item { value, depth: 0, weight }
    }
}

struct Unpickler<'a, 'p> {
    input: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for errors.
    op_at: usize,
    path: &'p Path,
    stack: Vec<Item<'a>>,
    marks: Vec<usize>,
    /// Copies, not shared references as in Python: numpy's pickles only fetch back values nothing changes
    /// afterwards (globals, dtypes, shapes, strings), and copies keep the value tree free of cycles.
    memo: HashMap<u32, Item<'a>>,
    copy_budget: usize,
}

/// Decodes a pickle stream. `path` names the file in errors, whose byte offsets count from the start of the
/// stream (for an `np.save` file, from the end of the `.npy` header).
pub fn load<'a>(input: &'a [u8], path: &Path) -> Result<Value<'a>> {
    let copy_budget = COPY_BUDGET_BASE.saturating_add(input.len().saturating_mul(4));
    let mut u = Unpickler { input, pos: 0, op_at: 0, path, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), copy_budget };
    u.run()
}

impl<'a> Unpickler<'a, '_> {
    fn fail<T>(&self, msg: impl fmt::Display) -> Result<T> {
        bail!("{}: pickle byte {}: {msg}", self.path.display(), self.op_at)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        match self.pos.checked_add(n).filter(|&end| end <= self.input.len()) {
            Some(end) => {
                let s = &self.input[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => self.fail(format!("truncated: needs {n} more bytes, {} remain", self.input.len() - self.pos)),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn len8(&mut self) -> Result<usize> {
        let n = u64::from_le_bytes(self.take(8)?.try_into().unwrap());
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.input[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else { return self.fail("truncated: unterminated GLOBAL name") };
        let line = self.take(n + 1)?;
        match std::str::from_utf8(&line[..n]) {
            Ok(s) => Ok(s),
            Err(_) => self.fail("GLOBAL name is not text"),
        }
    }

    fn string(&mut self, n: usize) -> Result<Value<'a>> {
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Value::Str(s.to_owned())),
            Err(_) => self.fail("string is not valid UTF-8"),
        }
    }

    fn push(&mut self, value: Value<'a>) {
        self.stack.push(Item::leaf(value));
    }

    fn pop(&mut self) -> Result<Item<'a>> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("stack underflow");
        }
        Ok(self.stack.pop().unwrap())
    }

    fn top(&mut self) -> Result<&mut Item<'a>> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("stack underflow");
        }
        Ok(self.stack.last_mut().unwrap())
    }

    fn pop_mark(&mut self) -> Result<Vec<Item<'a>>> {
        let Some(mark) = self.marks.pop() else { return self.fail("no MARK on the stack") };
        Ok(self.stack.split_off(mark))
    }

    /// Wraps items in a container, tracking depth and weight.
    fn container(&self, items: Vec<Item<'a>>, make: impl FnOnce(Vec<Value<'a>>) -> Value<'a>) -> Result<Item<'a>> {
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return self.fail(format!("values nest deeper than {MAX_DEPTH} levels"));
        }
        let weight = items.iter().fold(NODE, |w, i| w.saturating_add(i.weight));
        Ok(Item { value: make(items.into_iter().map(|i| i.value).collect()), depth, weight })
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let item = self.top()?.clone();
        self.charge(item.weight)?;
        self.memo.insert(key, item);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        let Some(item) = self.memo.get(&key) else { return self.fail(format!("memo key {key} was never stored")) };
        let item = item.clone();
        self.charge(item.weight)?;
        self.stack.push(item);
        Ok(())
    }

    fn charge(&mut self, weight: usize) -> Result<()> {
        match self.copy_budget.checked_sub(weight) {
            Some(left) => {
                self.copy_budget = left;
                Ok(())
            }
            None => self.fail("copies through the memo exceed the memory budget (a hostile or corrupt pickle)"),
        }
    }

    /// Adds items to the list, dict or array-state at the top of the stack.
    fn extend_top(&mut self, items: Vec<Item<'a>>, pairs: bool) -> Result<()> {
        let (path, op_at) = (self.path.display().to_string(), self.op_at);
        let top = self.top()?;
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        let weight = items.iter().fold(0usize, |w, i| w.saturating_add(i.weight));
        match (&mut top.value, pairs) {
            (Value::List(list), false) => list.extend(items.into_iter().map(|i| i.value)),
            (Value::Dict(dict), true) => {
                if !items.len().is_multiple_of(2) {
                    bail!("{path}: pickle byte {op_at}: SETITEMS with an odd number of items");
                }
                let mut it = items.into_iter().map(|i| i.value);
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.push((k, v));
                }
            }
            (v, _) => {
                let what = if pairs { "set items on" } else { "append to" };
                bail!("{path}: pickle byte {op_at}: cannot {what} a {}", v.kind())
            }
        }
        top.depth = top.depth.max(depth);
        top.weight = top.weight.saturating_add(weight);
        if top.depth > MAX_DEPTH {
            bail!("{path}: pickle byte {op_at}: values nest deeper than {MAX_DEPTH} levels");
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Value<'a>> {
        for _ in 0..MAX_OPCODES {
            self.op_at = self.pos;
            if self.pos >= self.input.len() {
                return self.fail("truncated: the pickle ends before its STOP opcode");
            }
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if !(2..=5).contains(&proto) {
                        return self.fail(format!("pickle protocol {proto}; sgdm reads protocols 2 to 5"));
                    }
                }
                // FRAME only groups opcodes for buffered reading; its contents follow inline.
                0x95 => {
                    self.take(8)?;
                }
                b'.' => {
                    let item = self.pop()?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return self.fail("STOP with values left on the stack");
                    }
                    return Ok(item.value);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let item = self.top()?.clone();
                    self.charge(item.weight)?;
                    self.stack.push(item);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                    self.push(Value::Int(v.into()));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    if n > 8 {
                        return self.fail(format!("integer of {n} bytes does not fit in 64 bits"));
                    }
                    let bytes = self.take(n)?;
                    let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) { 0xff } else { 0 };
                    let mut le = [fill; 8];
                    le[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(le)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.len8()?;
                    let v = self.string(n)?;
                    self.push(v);
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.len8()?,
                    };
                    let bytes = self.take(n)?;
                    self.push(Value::Bytes(Cow::Borrowed(bytes)));
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b']' => self.push(Value::List(Vec::new())),
                b')' => self.push(Value::Tuple(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Item::leaf(Value::Dict(Vec::new())));
                    self.extend_top(items, true)?;
                }
                b'l' | b't' => {
                    let items = self.pop_mark()?;
                    let item = self.container(items, if op == b'l' { Value::List } else { Value::Tuple })?;
                    self.stack.push(item);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let item = self.container(items, Value::Tuple)?;
                    self.stack.push(item);
                }
                b'a' => {
                    let item = self.pop()?;
                    self.extend_top(vec![item], false)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_top(vec![k, v], true)?;
                }
                b'e' | b'u' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, op == b'u')?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?.value;
                    let module = self.pop()?.value;
                    match (&module, &name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?;
                        }
                        _ => return self.fail("STACK_GLOBAL on values that are not strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let item = self.reduce(callable.value, args)?;
                    self.stack.push(item);
                }
                b'b' => {
                    let state = self.pop()?;
                    self.build(state)?;
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(k.into())?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(k.into())?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                0x97 | 0x98 => return self.fail("out-of-band buffers (pickle protocol 5 buffer_callback) are not read"),
                op => return self.fail(format!("opcode 0x{op:02x} ({:?}) is not in the subset numpy writes", op as char)),
            }
        }
        self.fail(format!("more than {MAX_OPCODES} opcodes (numpy's EEG pickles have a few hundred)"))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match Global::resolve(module, name) {
            Some(g) => {
                self.push(Value::Global(g));
                Ok(())
            }
            None => self.fail(format!("global {module}.{name} is not allowed (only numpy array, dtype and scalar constructors are)")),
        }
    }

    fn reduce(&mut self, callable: Value<'a>, args: Item<'a>) -> Result<Item<'a>> {
        let Value::Global(g) = callable else {
            return self.fail(format!("REDUCE calls a {}, not an allowed global", callable.kind()));
        };
        let Value::Tuple(args) = args.value else { return self.fail(format!("REDUCE arguments are a {}, not a tuple", args.value.kind())) };
        let value = match (g, args.as_slice()) {
            (Global::Reconstruct, [Value::Global(Global::Ndarray), Value::Tuple(_), Value::Bytes(_)]) => {
                Value::Array(NdArray { dtype: Dtype::I8, shape: vec![0], data: ArrayData::Raw(Cow::Borrowed(&[])) })
            }
            (Global::Dtype, [Value::Str(descr), ..]) => match Dtype::parse(descr) {
                Some(d) => Value::Dtype(d),
                None => return self.fail(format!("numpy dtype {descr:?} is not read (float16/32/64, int8/32/64, <U, object are)")),
            },
            (Global::CodecsEncode, [Value::Str(s), Value::Str(enc)]) if enc == "latin1" || enc == "latin-1" => {
                match s.chars().map(|c| u8::try_from(c as u32).ok()).collect::<Option<Vec<u8>>>() {
                    Some(b) => Value::Bytes(Cow::Owned(b)),
                    None => return self.fail("_codecs.encode of a string beyond latin-1"),
                }
            }
            (Global::Scalar, [Value::Dtype(d), Value::Bytes(b)]) => match (*d, b.as_ref()) {
                (Dtype::F16, &[a, b]) => Value::Float(half::f16::from_le_bytes([a, b]).to_f64()),
                (Dtype::F32, b) if b.len() == 4 => Value::Float(f32::from_le_bytes(b.try_into().unwrap()).into()),
                (Dtype::F64, b) if b.len() == 8 => Value::Float(f64::from_le_bytes(b.try_into().unwrap())),
                (Dtype::I8, &[a]) => Value::Int((a as i8).into()),
                (Dtype::I32, b) if b.len() == 4 => Value::Int(i32::from_le_bytes(b.try_into().unwrap()).into()),
                (Dtype::I64, b) if b.len() == 8 => Value::Int(i64::from_le_bytes(b.try_into().unwrap())),
                (d, b) => return self.fail(format!("numpy scalar of dtype {d} with {} bytes is not read", b.len())),
            },
            (Global::FromBuffer, [Value::Bytes(b), Value::Dtype(d), Value::Tuple(shape), Value::Str(order)]) => {
                let shape = self.shape(shape)?;
                if order == "F" && shape.len() > 1 {
                    return self.fail("array in Fortran order; save it in C order (np.ascontiguousarray)");
                }
                Value::Array(self.array(*d, shape, ArrayData::Raw(b.clone()))?)
            }
            (g, args) => {
                let kinds: Vec<&str> = args.iter().map(Value::kind).collect();
                return self.fail(format!("REDUCE of {g:?} with arguments ({}) is not a form numpy writes", kinds.join(", ")));
            }
        };
        Ok(Item::leaf(value))
    }

    fn shape(&self, dims: &[Value]) -> Result<Vec<usize>> {
        let shape: Option<Vec<usize>> = dims.iter().map(|d| if let Value::Int(n) = d { usize::try_from(*n).ok() } else { None }).collect();
        match shape {
            Some(s) if s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_some() => Ok(s),
            _ => self.fail("array shape is not a tuple of sizes"),
        }
    }

    /// Checks that `data` holds exactly what `shape` and `dtype` need.
    fn array(&self, dtype: Dtype, shape: Vec<usize>, data: ArrayData<'a>) -> Result<NdArray<'a>> {
        let numel: usize = shape.iter().product();
        match (&data, dtype) {
            (ArrayData::Objects(v), Dtype::Object) if v.len() == numel => {}
            (ArrayData::Raw(b), d) if d != Dtype::Object && Some(b.len()) == numel.checked_mul(d.size()) => {}
            (ArrayData::Raw(b), d) => return self.fail(format!("{d} array of shape {shape:?} holds {} bytes, not {numel}×{}", b.len(), d.size())),
            (ArrayData::Objects(v), d) => return self.fail(format!("{d} array of shape {shape:?} is given {} objects", v.len())),
        }
        Ok(NdArray { dtype, shape, data })
    }

    fn build(&mut self, state: Item<'a>) -> Result<()> {
        let target = match &self.top()?.value {
            Value::Dtype(d) => Ok(Some(*d)),
            Value::Array(_) => Ok(None),
            v => Err(v.kind()),
        };
        let target = match target {
            Ok(t) => t,
            Err(kind) => return self.fail(format!("BUILD on a {kind} (only numpy arrays and dtypes are built)")),
        };
        let Value::Tuple(state_items) = state.value else {
            return self.fail(format!("BUILD with a {} state", state.value.kind()));
        };
        let built = match (target, state_items.as_slice()) {
            // numpy.dtype.__setstate__: (version, byte order, subdescr, names, fields, elsize, alignment, flags).
            (Some(d), [Value::Int(_), Value::Str(order), ..]) => {
                if order == ">" {
                    return self.fail(format!("big-endian {d} array; save it little-endian (arr.astype('<{}'))", short(d)));
                }
                Value::Dtype(d)
            }
            // ndarray.__setstate__: ([version,] shape, dtype, is_fortran, data).
            (None, [.., Value::Tuple(shape), Value::Dtype(dtype), Value::Bool(fortran), _]) => {
                let shape = self.shape(shape)?;
                if *fortran && shape.len() > 1 {
                    return self.fail("array in Fortran order; save it in C order (np.ascontiguousarray)");
                }
                let dtype = *dtype;
                let data = match state_items.into_iter().last() {
                    Some(Value::Bytes(b)) => ArrayData::Raw(b),
                    Some(Value::List(v)) => ArrayData::Objects(v),
                    v => return self.fail(format!("ndarray data is a {}, not bytes or a list", v.map_or("nothing", |v| v.kind()))),
                };
                Value::Array(self.array(dtype, shape, data)?)
            }
            (Some(_), _) => return self.fail("BUILD of a numpy dtype with a state numpy does not write"),
            (None, _) => return self.fail("BUILD of a numpy array with a state numpy does not write"),
        };
        let top = self.top()?;
        top.value = built;
        top.depth = top.depth.max(state.depth.saturating_add(1));
        top.weight = top.weight.saturating_add(state.weight);
        if top.depth > MAX_DEPTH {
            return self.fail(format!("values nest deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }
}

fn short(d: Dtype) -> &'static str {
    match d {
        Dtype::F16 => "f2",
        Dtype::F32 => "f4",
        Dtype::F64 => "f8",
        Dtype::I8 => "i1",
        Dtype::I32 => "i4",
        Dtype::I64 => "i8",
        Dtype::Unicode(_) => "U",
        Dtype::Object => "O",
    }
}
