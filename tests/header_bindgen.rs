//! `include/compresskv.h` against the Rust exports, through bindgen at test time:
//! - every function of the header is a `#[no_mangle]` export of `src/ffi/` with the same parameters
//!   (count, and types up to naming: enums are `i32` on the Rust side) and return type, and every export is
//!   declared in the header;
//! - the size, alignment and field offsets of every struct match the `#[repr(C)]` mirrors in
//!   `compresskv::ffi`;
//! - every enum constant and `#define` of the header has the same value in `compresskv::ffi`.
//!
//! Needs libclang (Debian/Ubuntu: `libclang-dev`); without it the test fails saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::mem::{align_of, offset_of, size_of};
use std::path::Path;

use compresskv::ffi;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn bindings() -> String {
    let header = Path::new(MANIFEST_DIR).join("include/compresskv.h");
    let header = header.to_str().expect("UTF-8 path").to_string();
    let result = std::panic::catch_unwind(move || {
        bindgen::Builder::default()
            .header(header)
            .allowlist_function("ckv_.*")
            .allowlist_type("ckv_.*")
            .allowlist_var("CKV_.*")
            .layout_tests(true)
            .generate()
    });
    let hint = "install libclang-dev (Debian/Ubuntu: apt-get install libclang-dev) or point LIBCLANG_PATH at libclang";
    match result {
        Ok(Ok(b)) => b.to_string(),
        Ok(Err(e)) => panic!("bindgen failed on include/compresskv.h: {e} (if libclang is missing: {hint})"),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("bindgen could not run ({msg}): {hint}")
        }
    }
}

/// A function signature: name, canonical parameter types, canonical return type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sig {
    params: Vec<String>,
    ret: String,
}

/// Canonical spelling of a type: path prefixes dropped, enums and `int32_t` both `i32`.
fn canon(ty: &str) -> String {
    let mut rest = ty.trim();
    let mut out = String::new();
    loop {
        if let Some(r) = rest.strip_prefix("*const ") {
            out.push_str("*const ");
            rest = r.trim_start();
        } else if let Some(r) = rest.strip_prefix("*mut ") {
            out.push_str("*mut ");
            rest = r.trim_start();
        } else {
            break;
        }
    }
    let base = rest.rsplit("::").next().unwrap_or(rest).trim();
    let base = match base {
        "ckv_status" | "ckv_type" | "ckv_method" | "ckv_pool" | "ckv_alloc" | "c_int" | "c_uint" => "i32",
        "" | "()" => "()",
        b => b,
    };
    out.push_str(base);
    out
}

/// Split `a: T, b: U,` at top-level commas into canonical types.
fn param_types(list: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut cur) = (0i32, String::new());
    for ch in list.chars() {
        match ch {
            '(' | '[' | '<' => depth += 1,
            ')' | ']' | '>' => depth -= 1,
            _ => {}
        }
        if ch == ',' && depth == 0 {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(ch);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .map(|p| {
            let ty = p
                .split_once(": ")
                .map(|(_, t)| t)
                .unwrap_or_else(|| panic!("parameter without a type: {p:?}"));
            canon(ty)
        })
        .collect()
}

/// From `NAME(` at `s[at..]`: the name, the parameter list and the text after the closing parenthesis.
fn parse_fn(s: &str) -> (String, String, &str) {
    let open = s.find('(').expect("(");
    let name = s[..open].trim().to_string();
    let mut depth = 0;
    for (i, ch) in s[open..].char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return (name, s[open + 1..open + i].to_string(), &s[open + i + 1..]);
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses after {name}")
}

fn ret_type(after: &str, end: char) -> String {
    let r = after[..after.find(end).expect("end of signature")].trim();
    canon(r.strip_prefix("->").unwrap_or("()").trim())
}

fn header_functions(b: &str) -> BTreeMap<String, Sig> {
    let mut out = BTreeMap::new();
    for (at, _) in b.match_indices("pub fn ") {
        let (name, params, after) = parse_fn(&b[at + "pub fn ".len()..]);
        out.insert(
            name,
            Sig {
                params: param_types(&params),
                ret: ret_type(after, ';'),
            },
        );
    }
    out
}

fn rust_exports(src: &str) -> BTreeMap<String, Sig> {
    let mut out = BTreeMap::new();
    // Attribute lines only (not mentions in docs or comments).
    for (at, _) in src.match_indices("\n#[no_mangle]\n") {
        let rest = &src[at + 1..];
        let f = rest.find("fn ").expect("fn after #[no_mangle]");
        let (name, params, after) = parse_fn(&rest[f + 3..]);
        out.insert(
            name,
            Sig {
                params: param_types(&params),
                ret: ret_type(after, '{'),
            },
        );
    }
    out
}

/// `["Size of X"][... - 64usize];` statements (rustfmt may wrap long ones): (kind, struct, field) -> value.
fn layout_facts(b: &str) -> BTreeMap<(String, String, String), usize> {
    let mut out = BTreeMap::new();
    let flat = b.split_whitespace().collect::<Vec<_>>().join(" ");
    for stmt in flat.split("usize];") {
        let Some(at) = stmt.rfind("[\"") else { continue };
        let Some((label, expr)) = stmt[at + 2..].split_once("\"]") else {
            continue;
        };
        let value: usize = match expr.rsplit_once(" - ") {
            Some((_, v)) => v.trim().parse().expect("layout value"),
            None => continue,
        };
        let key = if let Some(s) = label.strip_prefix("Size of ") {
            ("size".to_string(), s.to_string(), String::new())
        } else if let Some(s) = label.strip_prefix("Alignment of ") {
            ("align".to_string(), s.to_string(), String::new())
        } else if let Some(s) = label.strip_prefix("Offset of field: ") {
            let (st, f) = s.split_once("::").expect("struct::field");
            ("offset".to_string(), st.to_string(), f.to_string())
        } else {
            continue;
        };
        out.insert(key, value);
    }
    out
}

/// `pub const NAME: T = V;` lines: constant name (from its `CKV_` part) -> value.
fn header_constants(b: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for line in b.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else {
            continue;
        };
        let (name, rest) = rest.split_once(':').expect("const name");
        let value = rest
            .split_once('=')
            .expect("const value")
            .1
            .trim()
            .trim_end_matches(';')
            .trim();
        let name = &name[name
            .find("CKV_")
            .unwrap_or_else(|| panic!("constant {name} without CKV_"))..];
        out.insert(
            name.to_string(),
            value.parse().unwrap_or_else(|_| panic!("constant {name} = {value}")),
        );
    }
    out
}

macro_rules! mirror {
    ($t:ident { $($f:ident),* $(,)? }) => {
        (
            stringify!($t).to_string(),
            size_of::<ffi::$t>(),
            align_of::<ffi::$t>(),
            vec![$((stringify!($f).to_string(), offset_of!(ffi::$t, $f))),*],
        )
    };
}

macro_rules! consts {
    ($($c:ident),* $(,)?) => { vec![$((stringify!($c).to_string(), ffi::$c as i64)),*] };
}

#[test]
fn header_matches_rust_exports() {
    let b = bindings();
    let mut files: Vec<_> = std::fs::read_dir(Path::new(MANIFEST_DIR).join("src/ffi"))
        .expect("src/ffi")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    let src: String = files
        .iter()
        .map(|f| format!("\n{}", std::fs::read_to_string(f).unwrap()))
        .collect();

    // Functions, both ways.
    let header = header_functions(&b);
    let rust = rust_exports(&src);
    assert!(
        header.len() >= 20,
        "too few functions parsed from the bindings: {:?}",
        header.keys()
    );
    let mut problems = Vec::new();
    for (name, sig) in &header {
        match rust.get(name) {
            None => problems.push(format!(
                "{name}: declared in the header, no #[no_mangle] export in src/ffi/"
            )),
            Some(r) if r.params.len() != sig.params.len() => problems.push(format!(
                "{name}: {} parameters in the header, {} in src/ffi/",
                sig.params.len(),
                r.params.len()
            )),
            Some(r) if r != sig => problems.push(format!("{name}: header {sig:?}, src/ffi/ {r:?}")),
            Some(_) => {}
        }
    }
    for name in rust.keys() {
        if !header.contains_key(name) {
            problems.push(format!("{name}: exported by src/ffi/, not declared in the header"));
        }
    }
    assert!(
        problems.is_empty(),
        "header and exports disagree:\n{}",
        problems.join("\n")
    );

    // Struct layouts, both ways.
    let facts = layout_facts(&b);
    let mirrors = vec![
        mirror!(ckv_params {
            size,
            method,
            budget,
            ratio,
            window,
            window_end,
            n_sink,
            pool_kernel,
            pool,
            chunk,
            n_srh,
            per_head,
            fill,
            floor,
            pyramid_beta,
            head_reduce
        }),
        mirror!(ckv_buffer {
            data,
            size,
            type_,
            n_embd,
            n_cells,
            transposed,
            stride
        }),
        mirror!(ckv_shape {
            n_layer,
            n_head,
            n_head_kv,
            head_dim
        }),
        mirror!(ckv_model_desc {
            arch,
            shape,
            fingerprint
        }),
        mirror!(ckv_seq_desc {
            size,
            n,
            pos,
            compressed,
            eog,
            n_tokens,
            n_probe,
            n_ubatch,
            iswa
        }),
        mirror!(ckv_request_info {
            skip,
            method,
            form,
            per_head,
            budget,
            n_decode,
            decode_idx,
            decode_pos,
            keep_last,
            text_index,
            text_len,
            note,
            note_warn,
            recon_chunk
        }),
        mirror!(ckv_request_facts {
            size,
            seq_id,
            n_after,
            kv_bytes_cell,
            type_k,
            type_v,
            v_trans,
            host,
            compact,
            checksum,
            window_text,
            ms_redecode,
            ms_compact,
            ms_total
        }),
        mirror!(ckv_flag {
            name,
            key,
            hint,
            help,
            completion_only
        }),
        mirror!(ckv_overflow {
            n_batch,
            n_keep,
            probe_start,
            probe_end,
            no_question
        }),
        mirror!(ckv_gather_block {
            base,
            span,
            first,
            n,
            reserved
        }),
    ];
    let header_structs: BTreeSet<&str> = facts.keys().map(|k| k.1.as_str()).collect();
    let mirror_structs: BTreeSet<&str> = mirrors.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(
        header_structs, mirror_structs,
        "structs with a layout in the header vs Rust mirrors"
    );
    for (name, size, align, fields) in &mirrors {
        let get = |kind: &str, f: &str| facts.get(&(kind.to_string(), name.clone(), f.to_string())).copied();
        assert_eq!(get("size", ""), Some(*size), "sizeof({name})");
        assert_eq!(get("align", ""), Some(*align), "alignof({name})");
        let header_fields: BTreeSet<&str> = facts
            .keys()
            .filter(|k| k.0 == "offset" && &k.1 == name)
            .map(|k| k.2.as_str())
            .collect();
        let rust_fields: BTreeSet<&str> = fields.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(header_fields, rust_fields, "fields of {name}");
        for (f, off) in fields {
            assert_eq!(get("offset", f), Some(*off), "offsetof({name}, {f})");
        }
    }

    // Constants, both ways.
    let hc = header_constants(&b);
    let rc: BTreeMap<String, i64> = consts![
        CKV_OK,
        CKV_ERR_NULL,
        CKV_ERR_INVALID_ARG,
        CKV_ERR_UNSUPPORTED_TYPE,
        CKV_ERR_SIZE,
        CKV_ERR_PROFILE,
        CKV_ERR_IO,
        CKV_ERR_ALLOC,
        CKV_ERR_PANIC,
        CKV_TYPE_F32,
        CKV_TYPE_F16,
        CKV_TYPE_Q4_0,
        CKV_TYPE_Q4_1,
        CKV_TYPE_Q5_0,
        CKV_TYPE_Q5_1,
        CKV_TYPE_Q8_0,
        CKV_TYPE_IQ4_NL,
        CKV_TYPE_BF16,
        CKV_METHOD_COMPRESSKV,
        CKV_METHOD_SNAPKV,
        CKV_METHOD_PYRAMIDKV,
        CKV_METHOD_STREAMINGLLM,
        CKV_METHOD_SNAPKV_SRH,
        CKV_METHOD_GATE,
        CKV_POOL_AVG,
        CKV_POOL_MAX,
        CKV_ALLOC_UNIFORM,
        CKV_ALLOC_PYRAMID,
        CKV_ALLOC_WEIGHTED,
        CKV_FORM_FILL,
        CKV_FORM_EXACT,
        CKV_FORM_MASK,
        CKV_VERSION_MAJOR,
        CKV_VERSION_MINOR,
        CKV_VERSION_PATCH,
    ]
    .into_iter()
    .collect();
    assert_eq!(hc, rc, "constants of the header vs compresskv::ffi");
}

#[test]
fn constants_agree_with_the_library() {
    use compresskv::types::GgmlType;
    use compresskv::Error;
    // Status codes are the Error variants' codes.
    let e = |s: &str| s.to_string();
    for (err, code) in [
        (Error::Null(e("")), ffi::CKV_ERR_NULL),
        (Error::InvalidArg(e("")), ffi::CKV_ERR_INVALID_ARG),
        (Error::UnsupportedType(e("")), ffi::CKV_ERR_UNSUPPORTED_TYPE),
        (Error::Size(e("")), ffi::CKV_ERR_SIZE),
        (Error::Profile(e("")), ffi::CKV_ERR_PROFILE),
        (Error::Io(e("")), ffi::CKV_ERR_IO),
        (Error::Alloc(e("")), ffi::CKV_ERR_ALLOC),
        (Error::Panic(e("")), ffi::CKV_ERR_PANIC),
    ] {
        assert_eq!(err.status(), code, "{err:?}");
    }
    // Type ids are ggml's, as GgmlType has them.
    for (t, id) in [
        (GgmlType::F32, ffi::CKV_TYPE_F32),
        (GgmlType::F16, ffi::CKV_TYPE_F16),
        (GgmlType::Q4_0, ffi::CKV_TYPE_Q4_0),
        (GgmlType::Q4_1, ffi::CKV_TYPE_Q4_1),
        (GgmlType::Q5_0, ffi::CKV_TYPE_Q5_0),
        (GgmlType::Q5_1, ffi::CKV_TYPE_Q5_1),
        (GgmlType::Q8_0, ffi::CKV_TYPE_Q8_0),
        (GgmlType::Iq4Nl, ffi::CKV_TYPE_IQ4_NL),
        (GgmlType::Bf16, ffi::CKV_TYPE_BF16),
    ] {
        assert_eq!(t as i32, id, "{t:?}");
    }
    assert_eq!(GgmlType::ALL.len(), 9);
    // The header's version macros are the crate's version.
    assert_eq!(
        format!(
            "{}.{}.{}",
            ffi::CKV_VERSION_MAJOR,
            ffi::CKV_VERSION_MINOR,
            ffi::CKV_VERSION_PATCH
        ),
        env!("CARGO_PKG_VERSION")
    );
}
