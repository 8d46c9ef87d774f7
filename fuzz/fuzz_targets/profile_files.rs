//! Structured profiles and the file entry points: `ckv_profile_parse` on valid profiles with one
//! corruption each (or none), checked against a model that matches or differs in one field;
//! `ckv_profile_load` of the same text from a file (and of missing files, directories, NULL);
//! `ckv_profile_find` over a directory of up to 7 entries (valid profiles for this model or another,
//! corrupt ones, arbitrary bytes, other extensions, hidden files, a directory named *.json, symbolic
//! links, dangling ones), with path buffers of every interesting size.
//! Oracles: each corruption is refused with CKV_ERR_PROFILE, the rest accepted; load agrees with parse;
//! find returns the first *.json regular file, in name order, whose profile is valid and for this model,
//! writes its path exactly (NUL-terminated, nothing past it), and otherwise leaves `*out` and the path
//! buffer as they were.

#![no_main]

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use common::*;
use compresskv::ffi::*;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const SENTINEL: usize = 0x7a7a_7a70;

fn ident(u: &mut Unstructured<'_>) -> Result<Ident> {
    let n_head_kv = u.int_in_range(1..=3)?;
    let fp: u64 = u.arbitrary()?;
    Ok(Ident {
        arch: u.choose(&["llama", "qwen2", "gemma3", "ümlaut"])?.to_string(),
        n_layer: u.int_in_range(1..=6)?,
        n_head: n_head_kv * u.int_in_range(1..=3)?,
        n_head_kv,
        head_dim: *u.choose(&[16, 32, 64])?,
        fingerprint: format!("{fp:016x}"),
    })
}

/// The same model with one field changed.
fn other(u: &mut Unstructured<'_>, id: &Ident) -> Result<Ident> {
    let mut o = id.clone();
    match u.int_in_range(0..=5)? {
        0 => o.arch.push('2'),
        1 => o.n_layer += 1,
        2 => {
            o.n_head *= 2;
        }
        3 => {
            o.n_head_kv = 1;
            o.n_head = id.n_head + 1;
        }
        4 => o.head_dim *= 2,
        _ => o.fingerprint = format!("{:016x}", u64::from_str_radix(&id.fingerprint, 16).unwrap() ^ 1),
    }
    Ok(o)
}

/// One corruption that makes a valid profile invalid, applied in place; its name.
fn corrupt(u: &mut Unstructured<'_>, v: &mut Value, id: &Ident) -> Result<&'static str> {
    let nl = id.n_layer;
    let nh = id.n_head;
    let l = u.int_in_range(0..=nl - 1)?;
    Ok(match u.int_in_range(0..=21)? {
        0 => {
            v["version"] = json!(*u.choose(&[0, 2, 7])?);
            "version"
        }
        1 => {
            v["version"] = json!("1");
            "version string"
        }
        2 => {
            v["version"] = json!(1.5);
            "version float"
        }
        3 => {
            let k = *u.choose(&["version", "model", "head_ranking", "head_scores", "layer_weights"])?;
            v.as_object_mut().unwrap().remove(k);
            "missing field"
        }
        4 => {
            v["extra"] = json!(1);
            "unknown field"
        }
        5 => {
            v["model"]["quant"] = json!("q4");
            "unknown model field"
        }
        6 => {
            v["model"]["arch"] = json!(*u.choose(&[json!(""), json!(5), json!(null)])?);
            "arch"
        }
        7 => {
            v["model"]["fingerprint"] = json!("");
            "empty fingerprint"
        }
        8 => {
            let k = *u.choose(&["arch", "n_layer", "n_head", "n_head_kv", "head_dim", "fingerprint"])?;
            v["model"].as_object_mut().unwrap().remove(k);
            "missing model field"
        }
        9 => {
            let k = *u.choose(&["n_layer", "n_head", "n_head_kv", "head_dim"])?;
            v["model"][k] = json!(*u.choose(&[json!(0), json!(-1), json!(2.5), json!("4")])?);
            "bad dimension"
        }
        10 => {
            v["model"]["n_layer"] = json!(nl + 1);
            "n_layer vs rows"
        }
        11 => {
            v["model"]["n_head_kv"] = json!(nh + 1);
            "n_head not a multiple"
        }
        12 if nh >= 2 => {
            let r = &mut v["head_ranking"][l];
            r[1] = r[0].clone();
            "ranking repeats a head"
        }
        13 => {
            v["head_ranking"][l][0] = json!(*u.choose(&[json!(nh), json!(-1), json!(0.5)])?);
            "ranking entry"
        }
        14 => {
            v["head_ranking"][l].as_array_mut().unwrap().pop();
            "ranking row short"
        }
        15 => {
            v["head_scores"][l].as_array_mut().unwrap().push(json!(0.1));
            "scores row long"
        }
        16 => {
            v["head_scores"][l][0] = json!(*u.choose(&[json!(null), json!("0.1"), json!([0.1])])?);
            "score not a number"
        }
        17 => {
            let w = v["layer_weights"].as_array_mut().unwrap();
            w.push(json!(0.0));
            "weights long"
        }
        18 if nl >= 2 => {
            let w0 = v["layer_weights"][0].as_f64().unwrap();
            v["layer_weights"][0] = json!(-0.25);
            v["layer_weights"][1] = json!(v["layer_weights"][1].as_f64().unwrap() + w0 + 0.25);
            "negative weight"
        }
        19 => {
            let w0 = v["layer_weights"][0].as_f64().unwrap();
            v["layer_weights"][0] = json!(w0 + *u.choose(&[1e-3, -2.0, 0.5, 1e-5])?);
            "weights do not sum to 1"
        }
        20 => {
            *v = json!(*u.choose(&[json!([]), json!("profile"), json!(null), json!(1)])?);
            "not an object"
        }
        _ => {
            v["model"] = json!([id.arch]);
            "model not an object"
        }
    })
}

/// A profile text: valid for `id` (maybe with harmless variations), or with one corruption. The name of
/// the corruption, if any.
fn profile_text(u: &mut Unstructured<'_>, id: &Ident, corrupted: bool) -> Result<(String, Option<&'static str>)> {
    let mut v = valid_profile(u, id)?;
    let mut what = None;
    if corrupted {
        what = Some(corrupt(u, &mut v, id)?);
    } else if one_in(u, 4)? {
        // within the 1e-6 tolerance
        let w0 = v["layer_weights"][0].as_f64().unwrap();
        v["layer_weights"][0] = json!(w0 + 1e-8);
    }
    let text = if u.arbitrary::<bool>()? {
        serde_json::to_string_pretty(&v).unwrap()
    } else {
        v.to_string()
    };
    Ok((text, what))
}

struct Desc {
    _arch: CString,
    _fp: CString,
    c: ckv_model_desc,
}

fn desc(id: &Ident) -> Desc {
    let arch = CString::new(id.arch.clone()).unwrap();
    let fp = CString::new(id.fingerprint.clone()).unwrap();
    let c = ckv_model_desc {
        arch: arch.as_ptr(),
        shape: ckv_shape {
            n_layer: id.n_layer as i32,
            n_head: id.n_head as i32,
            n_head_kv: id.n_head_kv as i32,
            head_dim: id.head_dim as i32,
        },
        fingerprint: fp.as_ptr(),
    };
    Desc {
        _arch: arch,
        _fp: fp,
        c,
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Parse (and load from `file`) `text`; `valid` says whether it is a valid profile, `matches` whether it
/// is for the model in `d` (when given).
fn parse_and_load(text: &[u8], file: &Path, d: Option<&Desc>, valid: bool, matches: bool) {
    let dp = d.map_or(std::ptr::null(), |d| &d.c as *const ckv_model_desc);
    let want_ok = valid && (d.is_none() || matches);
    std::fs::write(file, text).unwrap();
    let p = cpath(file);
    for (f, load) in [("ckv_profile_parse", false), ("ckv_profile_load", true)] {
        let mut out = SENTINEL as *mut ckv_profile;
        let marker = mark_last_error();
        // SAFETY: text valid for its length, path NUL-terminated, desc valid or NULL, out valid.
        let st = unsafe {
            if load {
                ckv_profile_load(p.as_ptr(), dp, &mut out)
            } else {
                ckv_profile_parse(text.as_ptr().cast(), text.len(), dp, &mut out)
            }
        };
        if want_ok {
            expect_ok(f, st, Some(&marker));
            assert!(!out.is_null() && out as usize != SENTINEL);
            // SAFETY: a live handle, freed once.
            unsafe { ckv_profile_free(out) };
        } else {
            expect_err(f, st, CKV_ERR_PROFILE);
            if valid {
                assert!(last_error().contains("another model"), "{}", last_error());
            }
            assert_eq!(out as usize, SENTINEL, "a refused {f} wrote *out");
        }
    }
}

/// Whether `Path::extension` of `name` is "json": the part after the last dot, the dot not leading.
fn json_ext(name: &str) -> bool {
    matches!(name.rfind('.'), Some(i) if i > 0 && &name[i + 1..] == "json")
}

fn find(u: &mut Unstructured<'_>, dir: &Path, id: &Ident) -> Result<()> {
    std::fs::create_dir_all(dir).unwrap();
    let mut expected: Vec<(String, bool)> = Vec::new(); // (name, is a match), for *.json regular files
    let mut names: Vec<String> = Vec::new();
    let n = u.int_in_range(0..=7)?;
    for i in 0..n {
        let stem: String = (0..u.int_in_range(1..=3)?)
            .map(|_| u.choose(&['a', 'b', 'B', '_', '0']).copied())
            .collect::<Result<_>>()?;
        let ext = *u.choose(&[".json", ".json", ".json", ".JSON", ".txt", "", ".json.bak", "json"])?;
        let lead = if one_in(u, 12)? { "." } else { "" };
        let name = format!("{lead}{stem}{i}{ext}");
        let path = dir.join(&name);
        let is_json = json_ext(&name);
        match u.int_in_range(0..=9)? {
            0..=2 => {
                let (t, _) = profile_text(u, id, false)?;
                std::fs::write(&path, t).unwrap();
                expected.push((name.clone(), true));
            }
            3 | 4 => {
                let o = other(u, id)?;
                let (t, _) = profile_text(u, &o, false)?;
                std::fs::write(&path, t).unwrap();
                expected.push((name.clone(), false));
            }
            5 => {
                let (t, _) = profile_text(u, id, true)?;
                std::fs::write(&path, t).unwrap();
                expected.push((name.clone(), false));
            }
            6 => {
                let len = u.int_in_range(0..=64)?;
                let b = u.bytes(len)?.to_vec();
                let ok = matches!(validate_profile(&b), Ok(ref got) if got == id);
                std::fs::write(&path, b).unwrap();
                expected.push((name.clone(), ok));
            }
            7 => {
                // a directory: never a profile
                std::fs::create_dir(&path).unwrap();
                names.push(name);
                continue;
            }
            8 => {
                // a link to a valid profile elsewhere (followed)
                let target = dir.with_extension(format!("target{i}"));
                let (t, _) = profile_text(u, id, false)?;
                std::fs::write(&target, t).unwrap();
                std::os::unix::fs::symlink(&target, &path).unwrap();
                expected.push((name.clone(), true));
            }
            _ => {
                // a dangling link: not a file
                std::os::unix::fs::symlink(dir.join("nowhere"), &path).unwrap();
                names.push(name);
                continue;
            }
        }
        names.push(name);
        if !is_json {
            expected.pop();
        }
    }
    expected.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let hit = expected.iter().find(|e| e.1).map(|e| dir.join(&e.0));

    let missing_dir = one_in(u, 16)?;
    let dir_c = if missing_dir {
        cpath(&dir.join("missing"))
    } else {
        cpath(dir)
    };
    let d = desc(id);
    let need = hit.as_ref().map_or(0, |p| p.as_os_str().len() + 1);
    let (buf_null, buf_size) = match pick(u, &[2, 4, 2, 2, 1])? {
        0 => (true, 0usize),
        1 => (false, need.max(1)),
        2 => (false, need.saturating_sub(1)),
        3 => (false, need + u.int_in_range(1..=40)?),
        _ => (true, u.int_in_range(1..=8)?),
    };
    let null_dir = one_in(u, 24)?;
    let null_model = one_in(u, 24)?;
    let null_out = one_in(u, 24)?;
    let mut buf = Buf::new(buf_size, u.int_in_range(0..=15)?);
    buf.all_mut().fill(0xee);
    let before = buf.all().to_vec();
    let mut out = SENTINEL as *mut ckv_profile;
    let marker = mark_last_error();
    // SAFETY: every pointer is NULL or valid for what the header asks (path_buf for buf_size bytes).
    let st = unsafe {
        ckv_profile_find(
            if null_dir { std::ptr::null() } else { dir_c.as_ptr() },
            if null_model { std::ptr::null() } else { &d.c },
            if buf_null {
                std::ptr::null_mut()
            } else {
                buf.ptr().cast()
            },
            buf_size,
            if null_out { std::ptr::null_mut() } else { &mut out },
        )
    };
    let f = "ckv_profile_find";
    tally(if hit.is_some() {
        "find: a match exists"
    } else {
        "find: no match"
    });
    let expect = if null_dir || null_model || (buf_null && buf_size > 0) || null_out {
        Some(CKV_ERR_NULL)
    } else if missing_dir {
        Some(CKV_ERR_IO)
    } else if hit.is_none() {
        Some(CKV_ERR_PROFILE)
    } else if !buf_null && buf_size < need {
        Some(CKV_ERR_SIZE)
    } else {
        None
    };
    match expect {
        None => {
            expect_ok(f, st, Some(&marker));
            assert!(!out.is_null() && out as usize != SENTINEL);
            // SAFETY: a live handle.
            let p = unsafe { &*out }.profile();
            assert_eq!(
                (&p.model.arch, p.model.n_layer, &p.model.fingerprint),
                (&id.arch, id.n_layer, &id.fingerprint)
            );
            // SAFETY: a live handle, freed once.
            unsafe { ckv_profile_free(out) };
            if !buf_null {
                let want = hit.unwrap();
                let want = want.as_os_str().as_bytes();
                let o = buf.off;
                assert_eq!(&buf.all()[o..o + want.len()], want, "entries {names:?}");
                assert_eq!(buf.all()[o + want.len()], 0);
                assert_eq!(
                    &buf.all()[o + want.len() + 1..],
                    &before[o + want.len() + 1..],
                    "wrote past the NUL"
                );
                assert_eq!(&buf.all()[..o], &before[..o]);
                return Ok(());
            }
        }
        Some(e) => {
            expect_err(f, st, e);
            assert_eq!(out as usize, SENTINEL, "a refused ckv_profile_find wrote *out");
            if e == CKV_ERR_PROFILE {
                let m = last_error();
                assert!(m.contains("no profile in"), "{m}");
                for (name, _) in expected.iter().take(8) {
                    assert!(m.contains(name.as_str()), "{name} not listed in {m}");
                }
            }
        }
    }
    assert_eq!(buf.all(), &before[..], "ckv_profile_find wrote path_buf");
    Ok(())
}

fn run(u: &mut Unstructured<'_>, dir: &Path) -> Result<()> {
    let id = ident(u)?;
    match u.int_in_range(0..=3)? {
        0 | 1 => {
            let corrupted = u.arbitrary::<bool>()?;
            let (text, what) = profile_text(u, &id, corrupted)?;
            let (d, matches) = match u.int_in_range(0..=2)? {
                0 => (None, true),
                1 => (Some(desc(&id)), true),
                _ => (Some(desc(&other(u, &id)?)), false),
            };
            let _ = what;
            std::fs::create_dir_all(dir).unwrap();
            parse_and_load(text.as_bytes(), &dir.join("p.json"), d.as_ref(), !corrupted, matches);
        }
        2 => find(u, dir, &id)?,
        _ => {
            // load: NULL path, NULL out, missing file, a directory, non-UTF-8 bytes
            std::fs::create_dir_all(dir).unwrap();
            let f = "ckv_profile_load";
            let mut out = SENTINEL as *mut ckv_profile;
            let missing = cpath(&dir.join("missing.json"));
            let (t, _) = profile_text(u, &id, false)?;
            let good = dir.join("good.json");
            std::fs::write(&good, t).unwrap();
            let good = cpath(&good);
            let bad = dir.join("bad.json");
            std::fs::write(&bad, [0xff, 0xfe, b'{', b'}']).unwrap();
            let bad = cpath(&bad);
            let dirc = cpath(dir);
            // SAFETY: every pointer is NULL or valid.
            unsafe {
                expect_err(
                    f,
                    ckv_profile_load(std::ptr::null(), std::ptr::null(), &mut out),
                    CKV_ERR_NULL,
                );
                expect_err(
                    f,
                    ckv_profile_load(good.as_ptr(), std::ptr::null(), std::ptr::null_mut()),
                    CKV_ERR_NULL,
                );
                expect_err(
                    f,
                    ckv_profile_load(missing.as_ptr(), std::ptr::null(), &mut out),
                    CKV_ERR_IO,
                );
                expect_err(
                    f,
                    ckv_profile_load(dirc.as_ptr(), std::ptr::null(), &mut out),
                    CKV_ERR_IO,
                );
                expect_err(
                    f,
                    ckv_profile_load(bad.as_ptr(), std::ptr::null(), &mut out),
                    CKV_ERR_PROFILE,
                );
                let mut bad_desc = desc(&id);
                bad_desc.c.shape.n_head_kv = 0;
                expect_err(
                    f,
                    ckv_profile_load(good.as_ptr(), &bad_desc.c, &mut out),
                    CKV_ERR_INVALID_ARG,
                );
                bad_desc.c.shape.n_head_kv = id.n_head_kv as i32;
                bad_desc.c.arch = std::ptr::null();
                expect_err(f, ckv_profile_load(good.as_ptr(), &bad_desc.c, &mut out), CKV_ERR_NULL);
                let bytes = [0xc3u8, 0x28, 0];
                bad_desc.c.arch = bytes.as_ptr().cast();
                expect_err(
                    f,
                    ckv_profile_load(good.as_ptr(), &bad_desc.c, &mut out),
                    CKV_ERR_INVALID_ARG,
                );
            }
            assert_eq!(out as usize, SENTINEL);
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    tally_input();
    thread_local! {
        static N: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let base: PathBuf = std::env::temp_dir().join(format!("ckv-fuzz-files-{}", std::process::id()));
    let k = N.with(|n| {
        n.set(n.get() + 1);
        n.get()
    });
    let dir = base.join(format!("d{}", k % 2));
    let _ = std::fs::remove_dir_all(&base);
    let _ = run(&mut Unstructured::new(data), &dir);
    let _ = std::fs::remove_dir_all(&base);
});
