//! The mechanical rewrite that lets a kernel file compile as host C++ under cudasim/include/cudasim_kernel.h.
//! Two constructs change, nothing else, and line numbers are kept (so compiler errors, race reports and
//! sanitizer traces point at the kernel's own file and line):
//!
//! 1. Inline PTX: `asm volatile("mma.sync... {%0, %1}, {%2}, ...;" : "+f"(d0), ... : "r"(a0), ...)` becomes
//!    `cudasim::ptx::mma_sync_...(out_f(d0), ..., in_r(a0), ...)`: one call per instruction, named after its
//!    opcode, with the operands in the order the PTX names them. The instruction's first operand (group) is its
//!    destination. Each operand is wrapped by its constraint letter, so an operand of the wrong width or kind
//!    fails to compile, as ptxas would refuse the register. An opcode the simulator does not implement is a
//!    compile error naming it, never a silent no-op.
//! 2. `__shared__` declarations become references to per-block storage the executor hands out (fresh and
//!    NaN-filled for every block); `extern __shared__ T x[];` becomes a pointer to the launch's dynamic part.

use anyhow::{bail, Result};

use crate::runtime::kernel_signature::ParsedKernel;

/// The twin source of one kernel file (or header), labelled `label` in `#line` directives.
pub fn rewrite(label: &str, source: &str) -> Result<String> {
    let with_asm = rewrite_asm(label, source)?;
    let with_shared = rewrite_shared(label, &with_asm)?;
    Ok(format!("#line 1 \"{label}\"\n{with_shared}"))
}

/// The table a twin exports to the simulator's driver: each kernel with its thunk and parameter names.
pub fn registration(kernels: &[ParsedKernel]) -> String {
    let mut s = String::from("\n#line 1 \"<cudasim registration>\"\nstatic const ::cudasim::TwinKernel cudasim_kernels[] = {\n");
    for k in kernels {
        let names: Vec<&str> = k.params.iter().map(|p| p.name.as_str()).collect();
        s.push_str(&format!("    CUDASIM_KERNEL({}, \"{}\"),\n", k.name, names.join(",")));
    }
    s.push_str(&format!(
        "}};\nextern \"C\" __attribute__((visibility(\"default\"))) int cudasim_twin_kernels(const ::cudasim::TwinKernel** out) {{\n    \
         *out = cudasim_kernels;\n    return {};\n}}\n",
        kernels.len()
    ));
    s
}

/// Byte ranges of `s` that are code (not comments, string or character literals), as a mask.
fn code_mask(s: &str) -> Vec<bool> {
    let b = s.as_bytes();
    let mut mask = vec![true; b.len()];
    let mut i = 0;
    while i < b.len() {
        let start = i;
        if b[i] == b'"' || b[i] == b'\'' {
            i = skip_literal(b, i);
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i = s[i + 2..].find("*/").map(|e| i + 2 + e + 2).unwrap_or(b.len());
        } else {
            i += 1;
            continue;
        }
        mask[start..i].fill(false);
    }
    mask
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Positions where the identifier `word` starts in code.
fn find_word(s: &str, mask: &[bool], word: &str) -> Vec<usize> {
    let b = s.as_bytes();
    s.match_indices(word)
        .map(|(i, _)| i)
        .filter(|&i| mask[i] && (i == 0 || !is_ident(b[i - 1])) && b.get(i + word.len()).is_none_or(|c| !is_ident(*c)))
        .collect()
}

/// The index just past the string or character literal that starts at `b[i]`.
fn skip_literal(b: &[u8], mut i: usize) -> usize {
    let quote = b[i];
    i += 1;
    while i < b.len() && b[i] != quote {
        i += if b[i] == b'\\' { 2 } else { 1 };
    }
    (i + 1).min(b.len())
}

/// The index just past the bracket that closes the one at `open`, skipping string literals.
fn matching(s: &str, open: usize) -> Option<usize> {
    let b = s.as_bytes();
    let (o, c) = (
        b[open],
        match b[open] {
            b'(' => b')',
            b'[' => b']',
            b'{' => b'}',
            _ => return None,
        },
    );
    let mut depth = 0;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                i = skip_literal(b, i);
                continue;
            }
            x if x == o => depth += 1,
            x if x == c => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Splits at `sep` outside brackets and string literals.
fn split_top(s: &str, sep: u8) -> Vec<&str> {
    let b = s.as_bytes();
    let (mut out, mut depth, mut start, mut i) = (Vec::new(), 0i32, 0, 0);
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                i = skip_literal(b, i);
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            x if x == sep && depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&s[start..]);
    out
}

/// The concatenation of the C string literals in `s`, with \n and \t unescaped.
fn string_literals(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(other) => out.push(other),
                    None => {}
                },
                c => out.push(c),
            }
        }
    }
    out
}

struct Operand {
    constraint: char,
    output: bool,
    expr: String,
}

fn parse_operands(section: Option<&str>, output: bool, at: &str) -> Result<Vec<Operand>> {
    let Some(section) = section.filter(|s| !s.trim().is_empty()) else { return Ok(Vec::new()) };
    split_top(section, b',')
        .into_iter()
        .map(|o| {
            let o = o.trim();
            let (Some(open), true) = (o.find('('), o.ends_with(')')) else { bail!("{at}: cannot read the asm operand `{o}`") };
            let constraint = string_literals(&o[..open]);
            let letter = constraint.trim_start_matches(['=', '+', '&']).chars().next().unwrap_or(' ');
            if !"hrfld".contains(letter) {
                bail!("{at}: asm constraint \"{constraint}\" is not simulated (registers h, r, l, f, d are)");
            }
            Ok(Operand { constraint: letter, output, expr: o[open + 1..o.len() - 1].trim().to_string() })
        })
        .collect()
}

/// The C++ calls for the body of one asm statement.
fn asm_calls(body: &str, at: &str) -> Result<String> {
    let sections = split_top(body, b':');
    let template = string_literals(sections[0]);
    let mut operands = parse_operands(sections.get(1).copied(), true, at)?;
    operands.extend(parse_operands(sections.get(2).copied(), false, at)?);
    let mut calls = Vec::new();
    for instruction in template.split(';').map(str::trim).filter(|i| !i.is_empty()) {
        let (opcode, rest) = instruction.split_once(char::is_whitespace).unwrap_or((instruction, ""));
        if instruction.starts_with('{') || rest.trim_start().starts_with(".reg") {
            bail!("{at}: PTX blocks with local registers are not simulated: `{instruction}`");
        }
        if rest.contains("%%") || rest.chars().zip(rest.chars().skip(1)).any(|(a, b)| a == '%' && b.is_ascii_alphabetic()) {
            bail!("{at}: PTX special or named registers are not simulated: `{instruction}`");
        }
        let mut args = Vec::new();
        for (group, text) in split_top(rest, b',').into_iter().enumerate() {
            let mut digits = text.split('%').skip(1);
            for d in digits.by_ref() {
                let n: usize = d
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect::<String>()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{at}: cannot read an operand reference in `{instruction}`"))?;
                let op = operands.get(n).ok_or_else(|| anyhow::anyhow!("{at}: `{instruction}` names %{n}, which does not exist"))?;
                if group == 0 {
                    if !op.output {
                        bail!("{at}: `{instruction}` writes %{n}, an input operand");
                    }
                    args.push(format!("::cudasim::ptx::out_{}({})", op.constraint, op.expr));
                } else {
                    args.push(format!("::cudasim::ptx::in_{}({})", op.constraint, op.expr));
                }
            }
        }
        let function: String = opcode.chars().map(|c| if c == '.' || c == ':' { '_' } else { c }).collect();
        calls.push(format!("::cudasim::ptx::{function}({})", args.join(", ")));
    }
    Ok(if calls.is_empty() { "((void)0)".to_string() } else { format!("({})", calls.join(", ")) })
}

fn line_of(s: &str, at: usize) -> usize {
    s[..at].matches('\n').count() + 1
}

fn rewrite_asm(label: &str, s: &str) -> Result<String> {
    let mask = code_mask(s);
    let mut starts: Vec<usize> = ["asm", "__asm__", "__asm"].iter().flat_map(|w| find_word(s, &mask, w)).collect();
    starts.sort();
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    for start in starts {
        if start < copied {
            continue;
        }
        let at = format!("{label}:{}", line_of(s, start));
        let mut i = start + s[start..].find(|c: char| !is_ident(c as u8)).unwrap_or(0);
        loop {
            let rest = &s[i..];
            let trimmed = rest.trim_start();
            i += rest.len() - trimmed.len();
            let word: String = trimmed.chars().take_while(|c| is_ident(*c as u8)).collect();
            if word == "volatile" || word == "__volatile__" {
                i += word.len();
            } else {
                break;
            }
        }
        if s.as_bytes().get(i) != Some(&b'(') {
            bail!("{at}: cannot read the asm statement");
        }
        let end = matching(s, i).ok_or_else(|| anyhow::anyhow!("{at}: unbalanced asm statement"))?;
        let body = &s[i + 1..end - 1];
        out.push_str(&s[copied..start]);
        out.push_str(&asm_calls(body, &at)?);
        out.push_str(&"\n".repeat(s[start..end].matches('\n').count()));
        copied = end;
    }
    out.push_str(&s[copied..]);
    Ok(out)
}

fn rewrite_shared(label: &str, s: &str) -> Result<String> {
    let mask = code_mask(s);
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    for at in find_word(s, &mask, "__shared__") {
        let place = format!("{label}:{}", line_of(s, at));
        let before = s[..at].trim_end();
        let is_extern = before.ends_with("extern") && before[..before.len() - 6].ends_with(|c: char| !is_ident(c as u8));
        let start = if is_extern { before.len() - 6 } else { at };
        let end = at + s[at..].find(';').ok_or_else(|| anyhow::anyhow!("{place}: __shared__ declaration without ';'"))?;
        let mut decl = s[at + "__shared__".len()..end].trim();
        let mut align = None;
        if let Some(rest) = decl.strip_prefix("__align__") {
            let rest = rest.trim_start();
            let close = rest.find(')').ok_or_else(|| anyhow::anyhow!("{place}: unreadable __align__"))?;
            align = Some(rest[1..close].trim().to_string());
            decl = rest[close + 1..].trim();
        }
        let declarators = split_top(decl, b',');
        // The first declarator carries the type: everything before its name.
        let first = declarators[0].trim();
        let name_end = first.find('[').unwrap_or(first.len());
        let head = first[..name_end].trim_end();
        let name_start = head.rfind(|c: char| !is_ident(c as u8)).map(|i| i + 1).unwrap_or(0);
        let ty = head[..name_start].trim();
        if ty.is_empty() {
            bail!("{place}: cannot read the type of the __shared__ declaration `{decl}`");
        }
        let mut replacement = Vec::new();
        for (k, d) in declarators.iter().enumerate() {
            let d = d.trim();
            let (name, dims) = if k == 0 {
                (&head[name_start..], first[name_end..].trim())
            } else {
                let e = d.find('[').unwrap_or(d.len());
                (d[..e].trim(), d[e..].trim())
            };
            let dims: String = dims.split_whitespace().collect::<Vec<_>>().join(" ");
            if !name.bytes().all(is_ident) || name.is_empty() {
                bail!("{place}: cannot read the __shared__ declarator `{d}`");
            }
            if is_extern {
                if dims != "[]" {
                    bail!("{place}: extern __shared__ {name} must be declared as {name}[]");
                }
                replacement.push(format!("{ty}* const {name} = static_cast<{ty}*>(::cudasim::dynamic_shared(alignof({ty})));"));
            } else {
                let align_arg = align.as_ref().map(|a| format!(", {a}")).unwrap_or_default();
                replacement.push(format!(
                    "static char cudasim_site_{name}; {ty} (&{name}){dims} = *::cudasim::shared<{ty} {dims}>(&cudasim_site_{name}, \"{name}\", __FILE__, __LINE__{align_arg});"
                ));
            }
        }
        out.push_str(&s[copied..start]);
        out.push_str(&replacement.join(" "));
        out.push_str(&"\n".repeat(s[start..end].matches('\n').count()));
        copied = end + 1;
    }
    out.push_str(&s[copied..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_ptx_becomes_calls_with_typed_operands_in_template_order() {
        let src = "x();\nasm(\"cvt.rn.bf16.f32 %0, %1;\" : \"=h\"(r) : \"f\"(x));\ny();";
        let out = rewrite_asm("k.cu", src).unwrap();
        assert_eq!(out, "x();\n(::cudasim::ptx::cvt_rn_bf16_f32(::cudasim::ptx::out_h(r), ::cudasim::ptx::in_f(x)));\ny();");
        let mma = "asm volatile(\n  \"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1}, {%2}, {%3}, \"\n  \"{%0, %1};\\n\"\n  : \"+f\"(d[0]), \"+f\"(d[1]) : \"r\"(a[0]), \"r\"(b0));";
        let out = rewrite_asm("k.cu", mma).unwrap();
        assert!(
            out.starts_with(
                "(::cudasim::ptx::mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(::cudasim::ptx::out_f(d[0]), \
             ::cudasim::ptx::out_f(d[1]), ::cudasim::ptx::in_r(a[0]), ::cudasim::ptx::in_r(b0), \
             ::cudasim::ptx::in_f(d[0]), ::cudasim::ptx::in_f(d[1])))"
            ),
            "{out}"
        );
        assert_eq!(out.matches('\n').count(), mma.matches('\n').count(), "line numbers are kept");
        assert_eq!(rewrite_asm("k.cu", "asm volatile(\"\" ::: \"memory\");").unwrap(), "((void)0);");
        // Comments and strings that mention asm are left alone.
        let quiet = "// asm(\"x\")\nconst char* s = \"asm(\";";
        assert_eq!(rewrite_asm("k.cu", quiet).unwrap(), quiet);
    }

    #[test]
    fn unsupported_ptx_is_an_error_naming_file_and_line() {
        let e = rewrite_asm("k.cu", "\n\nasm(\"mov.u32 %0, %%laneid;\" : \"=r\"(x));").unwrap_err().to_string();
        assert!(e.starts_with("k.cu:3:") && e.contains("special"), "{e}");
        let e = rewrite_asm("k.cu", "asm(\"add.s32 %0, %1, %2;\" : \"=r\"(x) : \"n\"(4), \"r\"(y));").unwrap_err().to_string();
        assert!(e.contains("constraint \"n\""), "{e}");
        let e = rewrite_asm("k.cu", "asm(\"st.u32 %0, %1;\" :: \"r\"(x), \"r\"(y));").unwrap_err().to_string();
        assert!(e.contains("writes %0, an input operand"), "{e}");
    }

    #[test]
    fn shared_declarations_become_per_block_storage() {
        let src = "  __shared__ __align__(16) bf16_t Ks[FA_KEYS * KLD];\n  __shared__ float a[8][32], b[8][32];\n  extern __shared__ float colsum[];\n  // __shared__ float not_this[4];\n";
        let out = rewrite_shared("k.cu", src).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "  static char cudasim_site_Ks; bf16_t (&Ks)[FA_KEYS * KLD] = *::cudasim::shared<bf16_t [FA_KEYS * KLD]>(&cudasim_site_Ks, \"Ks\", __FILE__, __LINE__, 16);"
        );
        assert!(
            lines[1].contains("float (&a)[8][32] = *::cudasim::shared<float [8][32]>(&cudasim_site_a") && lines[1].contains("float (&b)[8][32]"),
            "{}",
            lines[1]
        );
        assert_eq!(lines[2], "  float* const colsum = static_cast<float*>(::cudasim::dynamic_shared(alignof(float)));");
        assert_eq!(lines[3], "  // __shared__ float not_this[4];");
    }
}
