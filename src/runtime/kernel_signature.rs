//! Reads the `extern "C" __global__` kernel signatures of a preprocessed kernel file (macros expanded by the
//! host C preprocessor, so `ELEMENTWISE(bf16, BF16)` has become its kernels). Shared by build.rs, which turns them
//! into the kernel table every launch is checked against, and by the CUDA simulator, which registers each kernel
//! of a host-compiled twin under its name. Plain std: build.rs includes this file as a module.

/// What a launcher must pass for one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A device pointer, of any element type.
    Ptr,
    F32,
    F64,
    I32,
    U32,
    I64,
    U64,
}

impl ParamKind {
    pub fn rust_name(self) -> &'static str {
        match self {
            ParamKind::Ptr => "Ptr",
            ParamKind::F32 => "F32",
            ParamKind::F64 => "F64",
            ParamKind::I32 => "I32",
            ParamKind::U32 => "U32",
            ParamKind::I64 => "I64",
            ParamKind::U64 => "U64",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedParam {
    pub name: String,
    /// The declared type as written after preprocessing, e.g. `const BF16::raw*`.
    pub ty: String,
    pub kind: ParamKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKernel {
    pub name: String,
    pub params: Vec<ParsedParam>,
}

/// Every `extern "C" __global__ void name(...)` in `source` (preprocessed text), in order of appearance.
pub fn parse_kernels(source: &str) -> Result<Vec<ParsedKernel>, String> {
    let text = strip_comments(source);
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("extern") {
        let after = &rest[at + "extern".len()..];
        rest = after;
        let mut t = Tokens::new(after);
        if t.next() != Some("\"C\"") {
            continue;
        }
        if t.next() != Some("__global__") {
            continue;
        }
        if t.next() != Some("void") {
            return Err(format!("a kernel must return void: {}", first_line(after)));
        }
        let mut name = t.next().ok_or("a kernel signature ends early")?.to_string();
        if name == "__launch_bounds__" {
            t.skip_parenthesised()?;
            name = t.next().ok_or("a kernel signature ends early")?.to_string();
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("cannot read the kernel name in: {}", first_line(after)));
        }
        let params = t.parenthesised()?;
        let params =
            split_params(params).into_iter().map(|p| parse_param(&p).map_err(|e| format!("kernel {name}: {e}"))).collect::<Result<Vec<_>, _>>()?;
        out.push(ParsedKernel { name, params });
        rest = t.rest();
    }
    Ok(out)
}

fn first_line(s: &str) -> &str {
    s.trim_start().lines().next().unwrap_or("")
}

fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            out.push_str(&s[start..i]);
        } else if s[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if s[i..].starts_with("/*") {
            i = s[i + 2..].find("*/").map(|e| i + 2 + e + 2).unwrap_or(b.len());
            out.push(' ');
        } else {
            let c = s[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// A minimal tokenizer: identifiers/numbers, string literals, and single punctuation characters.
struct Tokens<'a> {
    s: &'a str,
}

impl<'a> Tokens<'a> {
    fn new(s: &'a str) -> Self {
        Tokens { s }
    }

    fn rest(&self) -> &'a str {
        self.s
    }

    fn next(&mut self) -> Option<&'a str> {
        self.s = self.s.trim_start();
        let mut chars = self.s.char_indices();
        let (_, c) = chars.next()?;
        let end = if c == '"' {
            let mut end = self.s.len();
            let mut escaped = false;
            for (i, ch) in self.s.char_indices().skip(1) {
                if escaped {
                    escaped = false;
                } else if ch == '\\' {
                    escaped = true;
                } else if ch == '"' {
                    end = i + 1;
                    break;
                }
            }
            end
        } else if c.is_ascii_alphanumeric() || c == '_' {
            self.s.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')).unwrap_or(self.s.len())
        } else {
            c.len_utf8()
        };
        let (tok, rest) = self.s.split_at(end);
        self.s = rest;
        Some(tok)
    }

    /// Consumes `( ... )` (balanced) and returns what is inside.
    fn parenthesised(&mut self) -> Result<&'a str, String> {
        self.s = self.s.trim_start();
        if !self.s.starts_with('(') {
            return Err(format!("expected '(' at: {}", first_line(self.s)));
        }
        let mut depth = 0;
        for (i, c) in self.s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        let inside = &self.s[1..i];
                        self.s = &self.s[i + 1..];
                        return Ok(inside);
                    }
                }
                _ => {}
            }
        }
        Err("unbalanced parentheses in a kernel signature".into())
    }

    fn skip_parenthesised(&mut self) -> Result<(), String> {
        self.parenthesised().map(|_| ())
    }
}

fn split_params(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut cur) = (0i32, String::new());
    for c in s.chars() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            out.push(cur.trim().to_string());
            cur.clear();
        } else {
            cur.push(c);
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

fn parse_param(p: &str) -> Result<ParsedParam, String> {
    let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
    let name_start = p.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map(|i| i + 1).unwrap_or(0);
    let (ty, name) = (p[..name_start].trim().to_string(), p[name_start..].to_string());
    if name.is_empty() || ty.is_empty() || name.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        return Err(format!("cannot read parameter '{p}' (every parameter needs a type and a name)"));
    }
    let ty_words: Vec<&str> = ty.split(|c: char| c.is_whitespace()).filter(|w| !w.is_empty() && *w != "const" && *w != "__restrict__").collect();
    let kind = if ty.contains('*') {
        ParamKind::Ptr
    } else {
        match ty_words.join(" ").as_str() {
            "float" => ParamKind::F32,
            "double" => ParamKind::F64,
            "int" | "signed" | "signed int" => ParamKind::I32,
            "unsigned" | "unsigned int" => ParamKind::U32,
            "long long" | "long long int" | "signed long long" | "int64_t" => ParamKind::I64,
            "unsigned long long" | "unsigned long long int" | "uint64_t" => ParamKind::U64,
            other => return Err(format!("parameter '{name}' has type '{other}', which a launcher cannot pass")),
        }
    };
    Ok(ParsedParam { name, ty, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_with_launch_bounds_macros_output_and_comments_are_read() {
        let src = r#"
// extern "C" __global__ void commented_out(float* x) {}
extern "C" __global__ void __launch_bounds__(256, 2) conv2d_forward_f32(const F32::raw* x, const float *w,
    int C, long long count, float alpha, double d, unsigned u) { body(); }
extern "C" int helper(int x);
extern "C" __global__ void plain(float* y) {}
"#;
        let k = parse_kernels(src).unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(k[0].name, "conv2d_forward_f32");
        let kinds: Vec<ParamKind> = k[0].params.iter().map(|p| p.kind).collect();
        use ParamKind::*;
        assert_eq!(kinds, [Ptr, Ptr, I32, I64, F32, F64, U32]);
        assert_eq!(k[0].params[0].ty, "const F32::raw*");
        assert_eq!(k[0].params[1].name, "w");
        assert_eq!(k[1].name, "plain");
    }

    #[test]
    fn a_parameter_a_launcher_cannot_pass_is_an_error_naming_it() {
        let err = parse_kernels("extern \"C\" __global__ void k(float2 v) {}").unwrap_err();
        assert!(err.contains("kernel k") && err.contains("'v'") && err.contains("float2"), "{err}");
    }
}
