//! The policy llama.cpp's tools take from the library through `llama.h`: the `--compresskv-*` flag table
//! (`llama_kv_compress_flag`) and the bounded-prefill plan of a prompt longer than the context
//! (`llama_kv_compress_overflow`).

use super::*;

/// The flags and the bounded-prefill plan come from the library through llama.h: the flag table with its
/// defaults, and the plan of a prompt longer than the context (its question scores the passes).
#[test]
fn flags_and_the_overflow_plan_come_from_the_library_through_llama_h() {
    let s = |p: *const c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    let mut flags = Vec::new();
    for i in 0.. {
        let (mut name, mut key, mut hint, mut help) =
            (std::ptr::null(), std::ptr::null(), std::ptr::null(), std::ptr::null());
        let mut completion_only = false;
        if unsafe { sys::llama_kv_compress_flag(i, &mut name, &mut key, &mut hint, &mut help, &mut completion_only) }
            != 0
        {
            break;
        }
        flags.push((s(name), s(key), s(hint), s(help), completion_only));
    }
    assert_eq!(flags.len(), compresskv::flags::FLAGS.len());
    assert_eq!(flags[0].0, "--compresskv");
    let budget = flags
        .iter()
        .find(|f| f.0 == "--compresskv-budget")
        .expect("--compresskv-budget");
    assert_eq!((budget.1.as_str(), budget.2.as_str()), ("budget", "N"));
    assert!(budget.3.ends_with("(default: 256)"), "{}", budget.3);
    assert!(flags.iter().any(|f| f.0 == "--compresskv-overflow-window" && f.4));

    let (_turn, model) = model();
    let toks = prompt_tokens(model);
    let mut err = [0 as c_char; 512];
    let plan = |opts: &str, n_cells: i32, err: &mut [c_char]| {
        let o = CString::new(opts).unwrap();
        let mut out = [2048i32, 0, 0, 0]; // n_batch (in: the largest), n_keep, probe_start, probe_end
        let [b, k, ps, pe] = &mut out;
        let rc = unsafe {
            sys::llama_kv_compress_overflow(
                model,
                o.as_ptr(),
                toks.as_ptr(),
                toks.len() as i32,
                n_cells,
                0,
                b,
                k,
                ps,
                pe,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        (rc, out)
    };
    // the prompt ends with the chat template's generation prompt: its question scores the passes
    let (rc, [n_batch, n_keep, ps, pe]) = plan("budget=256", 1020, &mut err);
    assert_eq!(rc, 0, "{}", s(err.as_ptr()));
    assert!(0 <= ps && ps < pe && (pe as usize) < toks.len(), "probe [{ps}, {pe})");
    assert!(n_keep >= 256 && n_batch > 0 && n_keep + n_batch + (pe - ps) <= 1020);
    // refusals name the flag to change
    assert_eq!(plan("budget=1000", 1020, &mut err).0, -1);
    assert!(s(err.as_ptr()).contains("leaves no room"), "{}", s(err.as_ptr()));
    assert_eq!(plan("budget=256;overflow=probe", 1020, &mut err).0, -1);
    assert!(
        s(err.as_ptr()).contains("needs --compresskv-probe"),
        "{}",
        s(err.as_ptr())
    );
}
